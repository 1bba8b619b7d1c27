//! The state machine of `ballot-bench catchup`: a table of `slots` fixed-size values (a map
//! from key to value with keys `0..slots`), so that its checkpoint really is as big as the
//! state. A command is `key u64 LE | value`; it overwrites the value at `key % slots`.
//!
//! The values live in 64 KiB pages behind `Arc`s: a checkpoint is a frozen copy that costs
//! one reference per page (the background writer reads the pages it was given), and the
//! first write to a page that a checkpoint still holds copies that page (copy on write).
//!
//! Checkpoint bytes: `magic u64 "BBTABLE1" | value u64 | slots u64 | values (slots x value)`.

use ballot::checkpoint::CheckpointSource;
use ballot::driver::StateMachine;
use ballot::Index;
use std::io::{self, Read, Write};
use std::sync::Arc;

const MAGIC: u64 = u64::from_le_bytes(*b"BBTABLE1");
const HEADER: usize = 24;
/// Bytes per page (values never straddle two pages).
pub const PAGE: usize = 64 << 10;
/// Largest state a checkpoint may claim (a corrupt header must not allocate terabytes).
const MAX_STATE: u64 = 64 << 30;

pub struct Table {
    value: usize,
    slots: u64,
    per_page: usize,
    pages: Vec<Arc<Vec<u8>>>,
}

impl Table {
    /// A table of `state_bytes / value` zeroed values (`value` in 1..=64 KiB).
    pub fn new(state_bytes: u64, value: usize) -> Table {
        assert!(
            (1..=PAGE).contains(&value),
            "value size {value} not in 1..={PAGE}"
        );
        Table::with_slots((state_bytes / value as u64).max(1), value)
    }

    fn with_slots(slots: u64, value: usize) -> Table {
        let per_page = PAGE / value;
        let n = slots.div_ceil(per_page as u64) as usize;
        let pages = (0..n)
            .map(|p| {
                let vals = (slots - (p * per_page) as u64).min(per_page as u64) as usize;
                Arc::new(vec![0u8; vals * value])
            })
            .collect();
        Table {
            value,
            slots,
            per_page,
            pages,
        }
    }

    /// Values in the table.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Bytes of state (what a checkpoint holds, without its header).
    #[cfg(test)]
    pub fn state_bytes(&self) -> u64 {
        self.slots * self.value as u64
    }

    /// The value at `key % slots`.
    #[cfg(test)]
    pub fn get(&self, key: u64) -> &[u8] {
        let slot = key % self.slots;
        let (p, at) = self.place(slot);
        &self.pages[p][at..at + self.value]
    }

    fn place(&self, slot: u64) -> (usize, usize) {
        let p = (slot / self.per_page as u64) as usize;
        let at = (slot % self.per_page as u64) as usize * self.value;
        (p, at)
    }
}

impl StateMachine for Table {
    fn apply(&mut self, _index: Index, command: &[u8], _out: &mut Vec<u8>) {
        if command.len() < 8 {
            return;
        }
        let key = u64::from_le_bytes(command[..8].try_into().expect("8 bytes"));
        let (p, at) = self.place(key % self.slots);
        let v = &command[8..];
        let n = v.len().min(self.value);
        Arc::make_mut(&mut self.pages[p])[at..at + n].copy_from_slice(&v[..n]);
    }

    fn checkpoint(&self) -> Option<Box<dyn CheckpointSource>> {
        Some(Box::new(Frozen {
            value: self.value,
            slots: self.slots,
            pages: self.pages.clone(),
        }))
    }

    fn restore(&mut self, r: &mut dyn Read) -> io::Result<()> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let eof = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad("table checkpoint ends early".into())
            } else {
                e
            }
        };
        let mut h = [0u8; HEADER];
        r.read_exact(&mut h).map_err(eof)?;
        let word = |k: usize| u64::from_le_bytes(h[k * 8..k * 8 + 8].try_into().expect("8"));
        if word(0) != MAGIC {
            return Err(bad("not a table checkpoint (bad magic)".into()));
        }
        let (value, slots) = (word(1), word(2));
        if !(1..=PAGE as u64).contains(&value)
            || slots == 0
            || slots.checked_mul(value).is_none_or(|b| b > MAX_STATE)
        {
            return Err(bad(format!(
                "table checkpoint claims {slots} values of {value} bytes"
            )));
        }
        // Decode into a new table; the state is replaced only once all of it has arrived.
        let mut t = Table::with_slots(slots, value as usize);
        for p in &mut t.pages {
            r.read_exact(Arc::get_mut(p).expect("not shared yet"))
                .map_err(eof)?;
        }
        let mut extra = [0u8; 1];
        loop {
            match r.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(bad("trailing bytes after the table checkpoint".into())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        *self = t;
        Ok(())
    }
}

/// A checkpoint's frozen view of the pages.
struct Frozen {
    value: usize,
    slots: u64,
    pages: Vec<Arc<Vec<u8>>>,
}

impl CheckpointSource for Frozen {
    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(&MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&(self.value as u64).to_le_bytes());
        h[16..].copy_from_slice(&self.slots.to_le_bytes());
        w.write_all(&h)?;
        for p in &self.pages {
            w.write_all(p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(key: u64, fill: u8, value: usize) -> Vec<u8> {
        let mut c = key.to_le_bytes().to_vec();
        c.extend(std::iter::repeat_n(fill, value));
        c
    }

    fn image(t: &Table) -> Vec<u8> {
        let mut out = Vec::new();
        t.checkpoint().unwrap().write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn checkpoint_is_frozen_and_restores() {
        let value = 56;
        let mut t = Table::new(1 << 20, value);
        assert_eq!(t.slots(), (1 << 20) / 56);
        for k in 0..5000u64 {
            t.apply(1, &cmd(k * 7, (k % 251) as u8, value), &mut Vec::new());
        }
        let mut src = t.checkpoint().unwrap();
        // Writes after the checkpoint do not reach it.
        t.apply(2, &cmd(0, 0xEE, value), &mut Vec::new());
        let mut img = Vec::new();
        src.write_to(&mut img).unwrap();
        assert_eq!(img.len() as u64, HEADER as u64 + t.state_bytes());
        let mut u = Table::new(4096, 8);
        u.restore(&mut img.as_slice()).unwrap();
        assert_eq!(u.slots(), t.slots());
        assert_eq!(u.get(0), &[0u8; 56][..], "the write after the checkpoint");
        assert_eq!(u.get(7), &[1u8; 56][..]);
        assert_eq!(t.get(0), &[0xEEu8; 56][..]);
        for k in 1..5000u64 {
            assert_eq!(u.get(k * 7), t.get(k * 7));
        }
    }

    #[test]
    fn bad_bytes_are_invalid_data_and_leave_the_state() {
        let value = 16;
        let mut t = Table::new(64 << 10, value);
        t.apply(1, &cmd(3, 9, value), &mut Vec::new());
        let good = image(&t);
        let mut u = Table::new(4096, value);
        u.apply(1, &cmd(1, 5, value), &mut Vec::new());
        let before = image(&u);
        let mut magic = good.clone();
        magic[0] ^= 1;
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut long = good.clone();
        long.push(0);
        for bad in [
            &good[..10],
            &good[..good.len() - 1],
            &magic[..],
            &huge[..],
            &long[..],
        ] {
            let e = u.restore(&mut &bad[..]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert_eq!(image(&u), before, "state unchanged after a failed restore");
        }
        u.restore(&mut good.as_slice()).unwrap();
        assert_eq!(u.get(3), &[9u8; 16][..]);
    }
}
