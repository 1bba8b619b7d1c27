//! Embedding Ballot: a replicated ledger of its own (not the key-value store), three durable
//! replicas in one process over the in-process fabric, started with `ballot::node`.
//!
//! ```text
//! cargo run --release -p ballot --example ledger
//! ```
//!
//! It starts a new cluster, moves money around, restarts the whole cluster from its data
//! dirs, shows the refusal of a wiped replica started without an initial cluster state, and
//! rebuilds that replica with `Existing`.

use ballot::checkpoint::{CheckpointPolicy, CheckpointSource};
use ballot::driver::StateMachine;
use ballot::mem_fabric::MemNet;
use ballot::node::{InitialClusterState, Node, NodeBuilder, StartError};
use ballot::protocol::ProposeError;
use ballot::Index;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Accounts and balances. Commands: `open NAME AMOUNT`, `move FROM TO AMOUNT`, `read NAME`;
/// the output is the balance after the command (or `refused`).
#[derive(Default, Clone)]
struct Ledger {
    accounts: BTreeMap<String, u64>,
}

impl Ledger {
    fn run(&mut self, cmd: &str) -> Option<u64> {
        let w: Vec<&str> = cmd.split_whitespace().collect();
        match w.as_slice() {
            ["open", name, amount] => {
                let a = amount.parse().ok()?;
                self.accounts.insert(name.to_string(), a);
                Some(a)
            }
            ["move", from, to, amount] => {
                let a: u64 = amount.parse().ok()?;
                let have = *self.accounts.get(*from)?;
                self.accounts.get(*to)?;
                let left = have.checked_sub(a)?;
                self.accounts.insert(from.to_string(), left);
                *self.accounts.get_mut(*to)? += a;
                Some(left)
            }
            ["read", name] => self.accounts.get(*name).copied(),
            _ => None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for (k, v) in &self.accounts {
            out.push_str(&format!("{k} {v}\n"));
        }
        out.into_bytes()
    }
}

impl StateMachine for Ledger {
    fn apply(&mut self, _index: Index, command: &[u8]) -> Vec<u8> {
        match std::str::from_utf8(command).ok().and_then(|c| self.run(c)) {
            Some(v) => v.to_string().into_bytes(),
            None => b"refused".to_vec(),
        }
    }

    fn checkpoint(&self) -> Option<Box<dyn CheckpointSource>> {
        Some(Box::new(Frozen(self.encode())))
    }

    fn restore(&mut self, checkpoint: &mut dyn Read) -> io::Result<()> {
        let mut text = String::new();
        checkpoint.read_to_string(&mut text)?;
        let mut accounts = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line
                .split_once(' ')
                .and_then(|(k, v)| Some((k, v.parse::<u64>().ok()?)))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad ledger line"))?;
            accounts.insert(k.to_string(), v);
        }
        self.accounts = accounts;
        Ok(())
    }
}

struct Frozen(Vec<u8>);

impl CheckpointSource for Frozen {
    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(&self.0)
    }
}

const MEMBERS: [u8; 3] = [0, 1, 2];

fn start(
    net: &MemNet,
    dir: &Path,
    id: u8,
    initial: Option<InitialClusterState>,
) -> Result<Node, StartError> {
    NodeBuilder::new(
        id,
        0x1ED6,
        MEMBERS.to_vec(),
        dir.join(format!("replica{id}")),
        Ledger::default,
    )
    .durable(true)
    .initial_cluster_state(initial)
    .checkpoints(CheckpointPolicy {
        every_bytes: 4096,
        ..CheckpointPolicy::default()
    })
    .notices(move |m| println!("  replica {id}: {m}"))
    .start(|setup| Ok(net.attach(setup.node, setup.region)))
}

/// Proposes `cmd` to whichever replica leads, retrying for a while.
fn propose(nodes: &[Option<Node>], cmd: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for n in nodes.iter().flatten() {
            match n
                .handle()
                .propose(cmd.as_bytes().to_vec(), Duration::from_secs(1))
            {
                Ok(out) => return String::from_utf8_lossy(&out).into_owned(),
                Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Indeterminate) => {}
                Err(e) => panic!("{cmd}: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no leader served {cmd:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() -> Result<(), StartError> {
    let dir: PathBuf = std::env::temp_dir().join(format!("ballot-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "a new cluster of three durable replicas in {}",
        dir.display()
    );
    let net = MemNet::instant();
    let mut nodes: Vec<Option<Node>> = MEMBERS
        .iter()
        .map(|&id| start(&net, &dir, id, Some(InitialClusterState::New)).map(Some))
        .collect::<Result<_, _>>()?;
    propose(&nodes, "open alice 100");
    propose(&nodes, "open bob 0");
    for _ in 0..30 {
        propose(&nodes, "move alice bob 3");
    }
    println!(
        "  alice {}, bob {}",
        propose(&nodes, "read alice"),
        propose(&nodes, "read bob")
    );

    println!("the whole cluster stops and restarts from its data dirs (no initial state needed)");
    nodes.clear();
    let net = MemNet::instant();
    let mut nodes: Vec<Option<Node>> = MEMBERS
        .iter()
        .map(|&id| start(&net, &dir, id, None).map(Some))
        .collect::<Result<_, _>>()?;
    let bob = propose(&nodes, "read bob");
    println!("  bob {bob} after the restart");
    assert_eq!(bob, "90");

    println!("replica 2 loses its disk");
    nodes[2] = None;
    std::fs::remove_dir_all(dir.join("replica2")).expect("wipe");
    match start(&net, &dir, 2, None) {
        Ok(_) => panic!("a wiped replica started without an initial cluster state"),
        Err(e) => println!("  refused: {e}"),
    }
    let rebuilt = start(&net, &dir, 2, Some(InitialClusterState::Existing))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rebuilt.handle().status().applied < nodes[0].as_ref().unwrap().handle().status().commit {
        assert!(Instant::now() < deadline, "replica 2 did not catch up");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "  replica 2 rebuilt from the others: {:?}, applied {}",
        rebuilt.handle().status().role,
        rebuilt.handle().status().applied
    );
    nodes[2] = Some(rebuilt);
    propose(&nodes, "move bob alice 10");
    println!("  alice {}", propose(&nodes, "read alice"));
    drop(nodes);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
