//! Embedding Ballot: a replicated ledger of its own (not the key-value store), three durable
//! replicas in one process over the in-process fabric, started with `ballot::node`.
//!
//! ```text
//! cargo run --release -p ballot --example ledger
//! ```
//!
//! It starts a new cluster, moves money around, restarts the whole cluster from its data
//! dirs, shows the refusal of a wiped replica started without an initial cluster state, and
//! rebuilds that replica with `Existing`. `ledger_cluster` runs the same ledger as three
//! processes over the TCP fabric.

use ballot::checkpoint::CheckpointPolicy;
use ballot::mem_fabric::MemNet;
use ballot::node::{InitialClusterState, Node, NodeBuilder, StartError};
use ballot::protocol::ProposeError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/ledger.rs"]
mod ledger;
use ledger::Ledger;

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
