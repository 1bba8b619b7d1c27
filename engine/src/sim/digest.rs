//! A stable digest of a simulation run: its report totals and its histories (every
//! replica's applied sequences, of every incarnation, and the client operation records).
//! `ballot-sim --digest` prints one per configuration, so that a refactoring of the core
//! can be shown to change no run at all.

use super::{Report, Sim};

/// CRC32C over a stream of words: stable across toolchains and platforms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Digest(u32);

impl Digest {
    /// Adds bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, b);
    }
    /// Adds a word (little-endian).
    pub fn word(&mut self, w: u64) {
        self.bytes(&w.to_le_bytes());
    }
    /// The digest so far.
    pub fn value(&self) -> u32 {
        self.0
    }

    /// Adds a run's report, its history digest included.
    pub fn report(&mut self, r: &Report) {
        for w in [
            r.commits,
            r.checkpoints,
            r.installs,
            r.disk_losses,
            r.blank_boots,
            r.acked as u64,
            r.crashes as u64,
            r.elections as u64,
            r.violations.len() as u64,
            u64::from(r.history),
        ] {
            self.word(w);
        }
        for v in &r.violations {
            self.bytes(v.as_bytes());
        }
    }
}

/// The digest of a run's histories.
pub(super) fn history(sim: &Sim) -> u32 {
    let mut d = Digest::default();
    let seq = |d: &mut Digest, s: &[(crate::types::Index, u64)]| {
        d.word(s.len() as u64);
        for &(i, id) in s {
            d.word(i);
            d.word(id);
        }
    };
    for n in &sim.nodes {
        d.word(n.past.len() as u64);
        for p in &n.past {
            seq(&mut d, p);
        }
        d.word(n.superseded.len() as u64);
        for p in &n.superseded {
            seq(&mut d, p);
        }
        match &n.replica {
            Some(r) => {
                let m = r.state_machine();
                d.word(m.superseded.len() as u64);
                for p in &m.superseded {
                    seq(&mut d, p);
                }
                seq(&mut d, &m.applied);
            }
            None => d.word(u64::MAX),
        }
    }
    d.word(sim.ops.len() as u64);
    for o in &sim.ops {
        d.bytes(format!("{o:?}").as_bytes());
    }
    d.value()
}
