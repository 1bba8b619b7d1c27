// Each example uses part of it.
#![allow(dead_code)]

//! The ledger state machine shared by the `ledger` and `ledger_cluster` examples: accounts
//! and balances, with checkpoints, and a digest of its state for comparing replicas.

use ballot::checkpoint::CheckpointSource;
use ballot::driver::StateMachine;
use ballot::Index;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// What a ledger last published: the log index its state reflects, its digest, and the
/// sum of every balance (moves conserve it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub index: Index,
    pub digest: u64,
    pub total: u64,
}

/// Accounts and balances. Commands: `open NAME AMOUNT`, `move FROM TO AMOUNT`, `read NAME`;
/// the output is the balance after the command (or `refused`).
#[derive(Default)]
pub struct Ledger {
    accounts: BTreeMap<String, u64>,
    /// The log index the state reflects (carried in checkpoints).
    index: Index,
    /// Where the state's digest goes after every apply and restore (read by other threads).
    publish: Option<Arc<Mutex<Published>>>,
}

impl Ledger {
    /// A ledger that publishes its digest into `cell`.
    pub fn publishing(cell: Arc<Mutex<Published>>) -> Self {
        Ledger {
            publish: Some(cell),
            ..Ledger::default()
        }
    }

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
        let mut out = format!("index {}\n", self.index);
        for (k, v) in &self.accounts {
            out.push_str(&format!("{k} {v}\n"));
        }
        out.into_bytes()
    }

    fn publish(&self) {
        if let Some(cell) = &self.publish {
            // FNV-1a over the encoded state (index included).
            let digest = self
                .encode()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            *cell.lock().unwrap() = Published {
                index: self.index,
                digest,
                total: self.accounts.values().sum(),
            };
        }
    }
}

impl StateMachine for Ledger {
    fn apply(&mut self, index: Index, command: &[u8], out: &mut Vec<u8>) {
        match std::str::from_utf8(command).ok().and_then(|c| self.run(c)) {
            Some(v) => out.extend_from_slice(v.to_string().as_bytes()),
            None => out.extend_from_slice(b"refused"),
        }
        self.index = index;
        self.publish();
    }

    fn checkpoint(&self) -> Option<Box<dyn CheckpointSource>> {
        Some(Box::new(Frozen(self.encode())))
    }

    fn restore(&mut self, checkpoint: &mut dyn Read) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad ledger checkpoint");
        let mut text = String::new();
        checkpoint.read_to_string(&mut text)?;
        let mut lines = text.lines();
        let index = lines
            .next()
            .and_then(|l| l.strip_prefix("index "))
            .and_then(|i| i.parse().ok())
            .ok_or_else(bad)?;
        let mut accounts = BTreeMap::new();
        for line in lines {
            let (k, v) = line
                .split_once(' ')
                .and_then(|(k, v)| Some((k, v.parse::<u64>().ok()?)))
                .ok_or_else(bad)?;
            accounts.insert(k.to_string(), v);
        }
        // Decoded whole before anything changes: on error the state is untouched.
        self.accounts = accounts;
        self.index = index;
        self.publish();
        Ok(())
    }
}

/// A frozen copy of the state, written out in the background as a checkpoint.
struct Frozen(Vec<u8>);

impl CheckpointSource for Frozen {
    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(&self.0)
    }
}
