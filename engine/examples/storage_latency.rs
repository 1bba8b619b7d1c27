//! Append + fdatasync latency of the durable log, and the write-path alternatives it was
//! chosen against. Numbers go to docs/durability.md.
//!
//! ```text
//! cargo run --release -p ballot --example storage_latency -- [DIR] [ITERATIONS]
//! ```
//! DIR defaults to a fresh directory under /var/tmp (a real disk, not tmpfs).

use ballot::layout::{encode_entry, entry_size, EntryHeader, ENTRY_HEADER_SIZE, SEAL_SIZE};
use ballot::storage::{LogOptions, SegmentLog};
use ballot::Ballot;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

type Sample = (String, Vec<Duration>);

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:<48} n={:<5} p50={:>7.1?} p90={:>7.1?} p99={:>7.1?} max={:>7.1?} mean={:>7.1?}",
        v.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        v[v.len() - 1],
        mean
    );
}

/// Payload so that one encoded entry is exactly `bytes`.
fn payload_for(bytes: usize) -> usize {
    bytes - ENTRY_HEADER_SIZE - SEAL_SIZE
}

fn segment_log(dir: &Path, batch: usize, entries_per_batch: usize, iters: usize) -> Sample {
    let sub = dir.join(format!("log-{batch}-{entries_per_batch}"));
    let _ = std::fs::remove_dir_all(&sub);
    let (mut log, _) = SegmentLog::open(&sub, LogOptions::default()).unwrap();
    let len = payload_for(batch / entries_per_batch);
    let payload = vec![0x5a; len];
    let mut index = 1;
    let mut lat = Vec::with_capacity(iters);
    for it in 0..iters + 20 {
        let t = Instant::now();
        for _ in 0..entries_per_batch {
            let h = EntryHeader {
                index,
                ballot: Ballot::new(1, 0),
                commit: index - 1,
                len: len as u32,
                flags: 0,
            };
            log.append_entry(&h, &payload).unwrap();
            index += 1;
        }
        log.sync().unwrap();
        if it >= 20 {
            lat.push(t.elapsed());
        }
    }
    drop(log);
    let _ = std::fs::remove_dir_all(&sub);
    let name = format!(
        "SegmentLog {} KiB = {entries_per_batch} x {} B entries",
        batch >> 10,
        entry_size(len)
    );
    (name, lat)
}

/// pwrite at the end of a growing file, then fdatasync (what SegmentLog does).
fn pwrite_append(dir: &Path, batch: usize, iters: usize) -> Sample {
    let p = dir.join("raw-append");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let buf = vec![0x5a; batch];
    let mut off = 0;
    let mut lat = Vec::with_capacity(iters);
    for it in 0..iters + 20 {
        let t = Instant::now();
        f.write_all_at(&buf, off).unwrap();
        f.sync_data().unwrap();
        off += batch as u64;
        if it >= 20 {
            lat.push(t.elapsed());
        }
    }
    let _ = std::fs::remove_file(&p);
    (
        format!("pwrite append (file grows) {} KiB", batch >> 10),
        lat,
    )
}

/// pwrite into a file whose blocks were written before (no allocation, no size change).
fn pwrite_prealloc(dir: &Path, batch: usize, iters: usize) -> Sample {
    let p = dir.join("raw-prealloc");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let total = batch * (iters + 20);
    f.write_all_at(&vec![0u8; total], 0).unwrap();
    f.sync_all().unwrap();
    let buf = vec![0x5a; batch];
    let mut lat = Vec::with_capacity(iters);
    for it in 0..iters + 20 {
        let t = Instant::now();
        f.write_all_at(&buf, (it * batch) as u64).unwrap();
        f.sync_data().unwrap();
        if it >= 20 {
            lat.push(t.elapsed());
        }
    }
    let _ = std::fs::remove_file(&p);
    (
        format!("pwrite overwrite (preallocated) {} KiB", batch >> 10),
        lat,
    )
}

/// memmap2: copy into a mapped, preallocated file, then msync(MS_SYNC) of the range.
fn mmap_prealloc(dir: &Path, batch: usize, iters: usize) -> Sample {
    let p = dir.join("raw-mmap");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let total = batch * (iters + 20);
    f.write_all_at(&vec![0u8; total], 0).unwrap();
    f.sync_all().unwrap();
    // SAFETY: the file is private to this benchmark and not resized while mapped.
    let mut m = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
    let buf = vec![0x5a; batch];
    let mut lat = Vec::with_capacity(iters);
    for it in 0..iters + 20 {
        let t = Instant::now();
        let off = it * batch;
        m[off..off + batch].copy_from_slice(&buf);
        m.flush_range(off, batch).unwrap();
        if it >= 20 {
            lat.push(t.elapsed());
        }
    }
    drop(m);
    let _ = std::fs::remove_file(&p);
    (
        format!("mmap + msync (preallocated) {} KiB", batch >> 10),
        lat,
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(Into::into).unwrap_or_else(|| {
        std::path::PathBuf::from(format!(
            "/var/tmp/ballot-storage-latency-{}",
            std::process::id()
        ))
    });
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    std::fs::create_dir_all(&dir).unwrap();
    println!("dir {} ({} iterations per line)", dir.display(), iters);
    // Sanity: an encoded entry of the computed payload is the batch size.
    let mut b = Vec::new();
    let len = payload_for(4096);
    let h = EntryHeader {
        index: 1,
        ballot: Ballot::ZERO,
        commit: 0,
        len: len as u32,
        flags: 0,
    };
    encode_entry(&mut b, &h, &vec![0; len]);
    assert_eq!(b.len(), 4096);

    // Interleaved rounds, so that every variant sees the same background load.
    let rounds = 5;
    let per_round = (iters / rounds).max(1);
    let mut all: Vec<Sample> = Vec::new();
    for _ in 0..rounds {
        for batch in [4 << 10, 64 << 10] {
            let samples = [
                segment_log(&dir, batch, 1, per_round),
                segment_log(&dir, batch, batch / 512, per_round),
                pwrite_append(&dir, batch, per_round),
                pwrite_prealloc(&dir, batch, per_round),
                mmap_prealloc(&dir, batch, per_round),
            ];
            for (name, lat) in samples {
                match all.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.extend(lat),
                    None => all.push((name, lat)),
                }
            }
        }
    }
    for (name, lat) in all {
        stats(&name, lat);
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("loadavg {}", l.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
