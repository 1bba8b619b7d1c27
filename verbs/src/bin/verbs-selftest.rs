//! Self-test of `ballot-verbs` against a real RDMA device (Soft-RoCE in the rxe VM).
//!
//! usage: verbs-selftest [--dev NAME] [--gid-index N] [--only verbs|fabric]
//!
//! Prints each check and a summary line; exits non-zero on the first failure.

use ballot::layout::{self, RegionInfo, RingGeometry};
use ballot::region::Region;
use ballot_verbs::error::wc_status_name;
use ballot_verbs::verbs::*;
use ballot_verbs::wr::{RecvList, Remote, SendList};
use ballot_verbs::VerbsError;
use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type R<T> = Result<T, String>;

/// Self-test of `ballot-verbs` against a real RDMA device.
#[derive(Parser, Debug)]
#[command(name = "verbs-selftest", version = ballot::version::VERSION)]
struct Args {
    /// RDMA device name (default: the first device).
    #[arg(long)]
    dev: Option<String>,
    /// GID index (default: the first IPv4-mapped GID of port 1).
    #[arg(long)]
    gid_index: Option<u32>,
    /// Run only the raw verbs checks or only the fabric checks.
    #[arg(long, value_parser = ["verbs", "fabric"])]
    only: Option<String>,
}

fn region(node: u8) -> Arc<Region> {
    let info = RegionInfo {
        cluster: 7,
        node,
        ring: RingGeometry::new(1 << 12, 1024).unwrap(),
    };
    Arc::new(Region::anonymous(info).unwrap())
}

fn wait(cq: &Cq, what: &str) -> R<WorkCompletion> {
    let start = Instant::now();
    let mut wc = [WorkCompletion::default(); 1];
    loop {
        if cq.poll(&mut wc).map_err(|e| e.to_string())? == 1 {
            return Ok(wc[0]);
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("{what}: no completion within 30 s"));
        }
        std::hint::spin_loop();
    }
}

fn check(cond: bool, what: &str) -> R<()> {
    if cond {
        println!("  ok   {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}"))
    }
}

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

/// Two RC QPs on one device, connected to each other: WRITE, READ, WRITE_WITH_IMM,
/// SEND/RECV, doorbell batches, revoking remote write, reset and reconnect.
fn verbs_checks(a: &Args) -> R<()> {
    println!("[verbs] raw verbs on one device");
    let e = |e: VerbsError| e.to_string();
    let ctx = Context::open(a.dev.as_deref()).map_err(e)?;
    let port = ctx.query_port(1).map_err(e)?;
    let gid_index = match a.gid_index {
        Some(g) => g,
        None => ctx.find_ipv4_gid(1).map_err(e)?,
    };
    let gid = ctx.query_gid(1, gid_index).map_err(e)?;
    println!(
        "  device {} port 1 active={} mtu={} gid[{gid_index}]={:02x?}",
        ctx.name(),
        port.active,
        mtu_bytes(port.active_mtu),
        &gid[10..]
    );
    let path = PathConfig {
        gid_index,
        ..PathConfig::default()
    };
    let pd = Pd::new(&ctx).map_err(e)?;
    let cq = Cq::new(&ctx, 256).map_err(e)?;
    let (ra, rb) = (region(0), region(1));
    let mra = Mr::register_region(&pd, &ra, 0, ra.len(), Access::REMOTE_RW).map_err(e)?;
    let mrb = Mr::register_region(&pd, &rb, 0, rb.len(), Access::REMOTE_RW).map_err(e)?;
    let stage = Mr::alloc(&pd, 1 << 20, Access::LOCAL).map_err(e)?;
    let caps = QpCaps {
        max_send_wr: 128,
        max_recv_wr: 64,
        max_sge: 1,
    };
    let mut qa = Qp::create_rc(&pd, &cq, &cq, caps).map_err(e)?;
    let mut qb = Qp::create_rc(&pd, &cq, &cq, caps).map_err(e)?;
    for q in [&mut qa, &mut qb] {
        q.hold(&stage).map_err(e)?;
    }
    qa.hold(&mra).map_err(e)?;
    qb.hold(&mrb).map_err(e)?;
    let ea = Endpoint {
        qpn: qa.num(),
        psn: 0x1234,
        gid,
    };
    let eb = Endpoint {
        qpn: qb.num(),
        psn: 0x5678,
        gid,
    };
    qa.connect(ea.psn, &eb, Access::REMOTE_RW, &path, port.active_mtu)
        .map_err(e)?;
    qb.connect(eb.psn, &ea, Access::REMOTE_RW, &path, port.active_mtu)
        .map_err(e)?;
    check(
        qa.state().map_err(e)? == 3 && qb.state().map_err(e)? == 3,
        "both QPs reach RTS",
    )?;
    let rb_remote = |off: usize| Remote {
        addr: mrb.addr() + off as u64,
        rkey: mrb.rkey(),
    };

    // WRITE: bytes land in B's region.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    stage.copy_in(0, &data).map_err(e)?;
    let mut sl = SendList::with_capacity(64);
    sl.write(
        1,
        &stage,
        0,
        data.len(),
        rb_remote(layout::RING_OFFSET),
        true,
    )
    .map_err(e)?;
    qa.post_send(&mut sl).map_err(e)?;
    let wc = wait(&cq, "write")?;
    check(wc.ok() && wc.wr_id == 1, "RDMA WRITE completes")?;
    let mut got = vec![0u8; data.len()];
    rb.read(layout::RING_OFFSET, &mut got).unwrap();
    check(got == data, "WRITE: 4096 bytes in the peer's region match")?;

    // READ back B's header (magic) into the staging buffer.
    sl.read(2, &stage, 8192, 32, rb_remote(0), true)
        .map_err(e)?;
    qa.post_send(&mut sl).map_err(e)?;
    check(wait(&cq, "read")?.ok(), "RDMA READ completes")?;
    let mut hdr = [0u8; 32];
    stage.copy_out(8192, &mut hdr).map_err(e)?;
    check(
        layout::decode_region_info(&hdr).map(|i| i.node) == Ok(1),
        "READ: peer header decodes (node 1)",
    )?;

    // SEND/RECV and WRITE_WITH_IMM (each consumes a receive at B).
    let mut rl = RecvList::with_capacity(4);
    rl.recv(100, &mrb, layout::RING_OFFSET + 65536, 4096)
        .map_err(e)?;
    rl.recv(101, &mrb, layout::RING_OFFSET + 65536 + 4096, 4096)
        .map_err(e)?;
    qb.post_recv(&mut rl).map_err(e)?;
    stage.copy_in(16384, b"hello over SEND").map_err(e)?;
    sl.send(3, &stage, 16384, 15, true).map_err(e)?;
    sl.write_imm(
        4,
        &stage,
        0,
        64,
        rb_remote(layout::RING_OFFSET + 128),
        0xabcd,
        true,
    )
    .map_err(e)?;
    qa.post_send(&mut sl).map_err(e)?;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(wait(&cq, "send/imm")?);
    }
    let recv = seen
        .iter()
        .find(|w| w.wr_id == 100)
        .ok_or("no RECV completion")?;
    check(
        recv.ok() && recv.byte_len == 15,
        "SEND/RECV: 15 bytes received",
    )?;
    let mut m = [0u8; 15];
    rb.read(layout::RING_OFFSET + 65536, &mut m).unwrap();
    check(&m == b"hello over SEND", "SEND/RECV: payload matches")?;
    let imm = seen
        .iter()
        .find(|w| w.wr_id == 101)
        .ok_or("no WRITE_WITH_IMM receive")?;
    check(
        imm.ok() && imm.imm == Some(0xabcd),
        "WRITE_WITH_IMM: immediate 0xabcd delivered",
    )?;
    check(seen.iter().all(|w| w.ok()), "all four completions succeed")?;

    // Doorbell batch: 32 unsignaled writes + 1 signaled; latency of single writes.
    let t = Instant::now();
    for i in 0..32u64 {
        sl.write(
            10 + i,
            &stage,
            0,
            256,
            rb_remote(layout::RING_OFFSET + 4096 + i as usize * 256),
            i == 31,
        )
        .map_err(e)?;
    }
    qa.post_send(&mut sl).map_err(e)?;
    let wc = wait(&cq, "batch")?;
    check(
        wc.ok() && wc.wr_id == 41,
        "33-request doorbell batch: one completion for the last",
    )?;
    println!(
        "  info batch of 32 x 256 B writes: {:.0} us",
        t.elapsed().as_secs_f64() * 1e6
    );
    let mut lats = Vec::new();
    for i in 0..200u64 {
        let t = Instant::now();
        sl.write(
            1000 + i,
            &stage,
            0,
            64,
            rb_remote(layout::RING_OFFSET),
            true,
        )
        .map_err(e)?;
        qa.post_send(&mut sl).map_err(e)?;
        if !wait(&cq, "lat")?.ok() {
            return Err("latency write failed".into());
        }
        lats.push(t.elapsed());
    }
    println!(
        "  info 64 B WRITE round trip (post to completion), median of 200: {:.1} us",
        median_us(lats)
    );

    // Revoke remote write at B: A's write must fail with a remote error, bytes unchanged.
    qb.set_access(Access::REMOTE_READ).map_err(e)?;
    check(
        qb.access() == Access::REMOTE_READ,
        "B revokes remote write (RTS->RTS access flags)",
    )?;
    rb.write(layout::RING_OFFSET, &[0u8; 64]).unwrap();
    stage.copy_in(0, &[0xEE; 64]).map_err(e)?;
    sl.write(50, &stage, 0, 64, rb_remote(layout::RING_OFFSET), true)
        .map_err(e)?;
    qa.post_send(&mut sl).map_err(e)?;
    let wc = wait(&cq, "revoked write")?;
    println!(
        "  info write after revoke completed with status {} ({})",
        wc.status,
        wc_status_name(wc.status)
    );
    let mapped = ballot_verbs::error::wc_to_fabric(wc.status, true, 1);
    check(
        !wc.ok() && mapped == ballot::fabric::FabricError::PermissionDenied(1),
        "write after revoke fails and maps to PermissionDenied",
    )?;
    let mut z = [0u8; 64];
    rb.read(layout::RING_OFFSET, &mut z).unwrap();
    check(z == [0u8; 64], "no byte of the refused write landed")?;
    check(
        qa.state().map_err(e)? == 6,
        "writer's QP is in ERR after the fence",
    )?;

    // Reset both QPs and reconnect with fresh PSNs: writes work again.
    qa.reset().map_err(e)?;
    qb.reset().map_err(e)?;
    let ea = Endpoint { psn: 0x2222, ..ea };
    let eb = Endpoint { psn: 0x3333, ..eb };
    qa.connect(ea.psn, &eb, Access::REMOTE_RW, &path, port.active_mtu)
        .map_err(e)?;
    qb.connect(eb.psn, &ea, Access::REMOTE_RW, &path, port.active_mtu)
        .map_err(e)?;
    while cq.poll(&mut [WorkCompletion::default(); 4]).map_err(e)? > 0 {}
    sl.write(60, &stage, 0, 64, rb_remote(layout::RING_OFFSET), true)
        .map_err(e)?;
    qa.post_send(&mut sl).map_err(e)?;
    let wc = wait(&cq, "write after reconnect")?;
    rb.read(layout::RING_OFFSET, &mut z).unwrap();
    check(
        wc.ok() && z == [0xEE; 64],
        "after reset + reconnect, the write lands",
    )?;

    // Safety net: a request naming an MR the QP does not hold is refused.
    let other = Mr::alloc(&pd, 4096, Access::LOCAL).map_err(e)?;
    sl.write(70, &other, 0, 8, rb_remote(layout::RING_OFFSET), true)
        .map_err(e)?;
    check(
        qa.post_send(&mut sl).is_err(),
        "posting from an MR the QP does not hold is refused",
    )?;
    Ok(())
}

fn main() {
    ballot_verbs::init_diagnostics();
    let args = Args::parse();
    let t = Instant::now();
    let mut r = Ok(());
    if args.only.as_deref() != Some("fabric") {
        r = verbs_checks(&args);
    }
    if r.is_ok() && args.only.as_deref() != Some("verbs") {
        r = ballot_verbs_fabric_checks(&args);
    }
    match r {
        Ok(()) => println!("verbs-selftest: PASS ({:.1} s)", t.elapsed().as_secs_f64()),
        Err(e) => {
            println!("verbs-selftest: FAIL: {e}");
            std::process::exit(1)
        }
    }
}

use ballot::fabric::{Completion, Fabric, FabricError, FabricEvent};
use ballot_verbs::{RdmaConfig, RdmaFabric};

/// Polls every fabric until `done` says so (30 s limit); events are kept per node.
fn drive(
    fs: &mut [RdmaFabric],
    evs: &mut [Vec<FabricEvent>],
    what: &str,
    mut done: impl FnMut(&[Vec<FabricEvent>]) -> bool,
) -> R<()> {
    let start = Instant::now();
    loop {
        for (f, e) in fs.iter_mut().zip(evs.iter_mut()) {
            f.poll(e);
        }
        if done(evs) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("{what}: not done within 30 s"));
        }
        std::thread::yield_now();
    }
}

fn write_result(evs: &[FabricEvent], tok: u64) -> Option<Result<(), FabricError>> {
    evs.iter().find_map(|e| match e {
        FabricEvent::Completion(Completion::Write { token, result, .. }) if *token == tok => {
            Some(result.clone())
        }
        _ => None,
    })
}

/// Three `RdmaFabric`s (nodes 0, 1, 2, one thread each for the TCP bootstrap, then driven
/// from this thread) on one device.
fn ballot_verbs_fabric_checks(a: &Args) -> R<()> {
    println!(
        "[fabric] RdmaFabric, 3 nodes on {}",
        a.dev.as_deref().unwrap_or("the first device")
    );
    let base = 19_400u16;
    let addr = |n: u8| -> std::net::SocketAddr { ([127, 0, 0, 1], base + n as u16).into() };
    let regions: Vec<Arc<Region>> = (0..3).map(region).collect();
    let mut threads = Vec::new();
    for n in 0..3u8 {
        let mut cfg = RdmaConfig::new(
            n,
            addr(n),
            (0..3).filter(|&p| p != n).map(|p| (p, addr(p))).collect(),
        );
        cfg.cluster = 7;
        cfg.key = b"verbs-selftest key".to_vec();
        cfg.device = a.dev.clone();
        cfg.gid_index = a.gid_index;
        let r = regions[n as usize].clone();
        threads.push(std::thread::spawn(move || RdmaFabric::connect(&cfg, r)));
    }
    let t0 = Instant::now();
    let mut fs = Vec::new();
    for t in threads {
        fs.push(
            t.join()
                .map_err(|_| "connect thread panicked")?
                .map_err(|e| e.to_string())?,
        );
    }
    println!(
        "  ok   3 fabrics connected over the TCP bootstrap in {:.0} ms (mtu {})",
        t0.elapsed().as_secs_f64() * 1e3,
        fs[0].mtu_bytes()
    );
    let mut evs: Vec<Vec<FabricEvent>> = vec![Vec::new(); 3];

    // Node 0 leads: followers 1 and 2 grant it write permission.
    fs[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
    fs[2].set_writer(Some(0)).map_err(|e| e.to_string())?;
    let mut entry = Vec::new();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let h = layout::EntryHeader {
        index: 1,
        ballot: ballot::Ballot::new(1, 0),
        commit: 0,
        len: payload.len() as u32,
        flags: 0,
    };
    layout::encode_entry(&mut entry, &h, &payload);
    let at = layout::RING_OFFSET;
    for p in [1u8, 2] {
        fs[0]
            .write(p, at, &entry, 100 + p as u64)
            .map_err(|e| e.to_string())?;
    }
    fs[0].flush().map_err(|e| e.to_string())?;
    drive(&mut fs, &mut evs, "replicate entry", |e| {
        write_result(&e[0], 101).is_some() && write_result(&e[0], 102).is_some()
    })?;
    check(
        write_result(&evs[0], 101) == Some(Ok(())) && write_result(&evs[0], 102) == Some(Ok(())),
        "leader 0 writes an entry into followers 1 and 2 (both complete Ok)",
    )?;
    for p in [1usize, 2] {
        let mut got = vec![0u8; entry.len()];
        regions[p].read(at, &mut got).unwrap();
        let d = layout::decode_entry(&got).map_err(|e| e.to_string())?;
        check(
            d.0 == h && d.1 == &payload[..],
            &format!("follower {p}: entry 1 decodes (seal + checksum) with the same payload"),
        )?;
    }

    // Commit cell and progress cells.
    let cc = layout::CommitCell {
        commit: 1,
        ballot: ballot::Ballot::new(1, 0),
    }
    .encode();
    fs[0]
        .write(1, layout::COMMIT_CELL_OFFSET, &cc, 110)
        .map_err(|e| e.to_string())?;
    let pc = layout::ProgressCell {
        ballot: ballot::Ballot::new(1, 0),
        received: 1,
        persisted: 1,
        applied: 0,
        consumed_slots: 4,
        stream: 1,
    };
    fs[1]
        .write(0, layout::progress_offset(1), &pc.encode(), 111)
        .map_err(|e| e.to_string())?;
    fs[0].flush().map_err(|e| e.to_string())?;
    fs[1].flush().map_err(|e| e.to_string())?;
    drive(&mut fs, &mut evs, "cells", |e| {
        write_result(&e[0], 110).is_some() && write_result(&e[1], 111).is_some()
    })?;
    let mut b = [0u8; layout::PROGRESS_ENCODED];
    regions[1]
        .read(layout::COMMIT_CELL_OFFSET, &mut b[..24])
        .unwrap();
    check(
        layout::CommitCell::decode(&b[..24])
            .ok()
            .flatten()
            .map(|c| c.commit)
            == Some(1),
        "commit cell written into follower 1",
    )?;
    regions[0].read(layout::progress_offset(1), &mut b).unwrap();
    check(
        layout::ProgressCell::decode(&b).ok().flatten() == Some(pc),
        "follower 1's progress cell lands at leader 0 (control QP)",
    )?;
    check(
        fs[1].write(0, layout::progress_offset(2), &pc.encode(), 1)
            == Err(FabricError::OutOfBounds(0)),
        "a write into another peer's progress cell is refused locally",
    )?;
    check(
        fs[0].write(1, 0, &[0u8; 8], 1) == Err(FabricError::OutOfBounds(1)),
        "a write over the region magic is refused locally",
    )?;

    // READ of the heartbeat / header.
    fs[1].region().store_word(layout::HEARTBEAT_OFFSET, 4242);
    fs[2].read(1, 0, 256, 120).map_err(|e| e.to_string())?;
    fs[2].flush().map_err(|e| e.to_string())?;
    let mut got = None;
    drive(&mut fs, &mut evs, "read", |e| {
        got = e[2].iter().find_map(|x| match x {
            FabricEvent::Completion(Completion::Read {
                token: 120, result, ..
            }) => Some(result.clone()),
            _ => None,
        });
        got.is_some()
    })?;
    let hdr = got.unwrap().map_err(|e| e.to_string())?;
    check(
        layout::decode_region_info(&hdr).map(|i| i.node) == Ok(1)
            && u64::from_le_bytes(hdr[128..136].try_into().unwrap()) == 4242,
        "node 2 READs node 1's header: region info and heartbeat 4242",
    )?;

    // Control messages: small, 1 MiB and MAX_CONTROL (fragmented over 16 receive buffers).
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13 % 256) as u8).collect();
    let max: Vec<u8> = (0..ballot::fabric::MAX_CONTROL as u32)
        .map(|i| (i % 199) as u8)
        .collect();
    let t = Instant::now();
    fs[1].send(0, b"promise").map_err(|e| e.to_string())?;
    fs[1].send(0, &big).map_err(|e| e.to_string())?;
    let mut sent_max = false;
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    drive(&mut fs, &mut evs, "messages", |e| {
        msgs = e[0]
            .iter()
            .filter_map(|x| match x {
                FabricEvent::Message { from: 1, bytes } => Some(bytes.clone()),
                _ => None,
            })
            .collect();
        msgs.len() >= 3 || (msgs.len() == 2 && !sent_max)
    })?;
    if msgs.len() == 2 {
        sent_max = true;
    }
    // MAX_CONTROL needs the earlier fragments' send slots back: send it after the first two.
    if sent_max {
        fs[1].send(0, &max).map_err(|e| e.to_string())?;
        drive(&mut fs, &mut evs, "max message", |e| {
            e[0].iter()
                .filter(|x| matches!(x, FabricEvent::Message { from: 1, .. }))
                .count()
                >= 3
        })?;
        msgs = evs[0]
            .iter()
            .filter_map(|x| match x {
                FabricEvent::Message { from: 1, bytes } => Some(bytes.clone()),
                _ => None,
            })
            .collect();
    }
    let secs = t.elapsed().as_secs_f64();
    check(
        msgs.len() == 3 && msgs[0] == b"promise" && msgs[1] == big && msgs[2] == max,
        &format!(
            "control messages of 7 B, 1 MiB and MAX_CONTROL ({} B) arrive intact and in order",
            max.len()
        ),
    )?;
    println!(
        "  info control messages: {:.1} MB in {:.0} ms ({:.1} MB/s)",
        (big.len() + max.len()) as f64 / 1e6,
        secs * 1e3,
        (big.len() + max.len()) as f64 / 1e6 / secs
    );
    check(
        fs[1]
            .send(0, &vec![0u8; ballot::fabric::MAX_CONTROL + 1])
            .is_err(),
        "a message over MAX_CONTROL is refused",
    )?;

    // Latency and throughput of the replication path (leader 0 to followers 1 and 2).
    let mut lats = Vec::new();
    let small = vec![7u8; 64];
    for k in 0..200u64 {
        let t = Instant::now();
        for p in [1u8, 2] {
            fs[0]
                .write(p, at + 4096, &small, 1000 + 2 * k + p as u64)
                .map_err(|e| e.to_string())?;
        }
        fs[0].flush().map_err(|e| e.to_string())?;
        let (t1, t2) = (1000 + 2 * k + 1, 1000 + 2 * k + 2);
        evs[0].clear();
        drive(&mut fs, &mut evs, "lat", |e| {
            write_result(&e[0], t1).is_some() && write_result(&e[0], t2).is_some()
        })?;
        lats.push(t.elapsed());
    }
    println!(
        "  info 64 B write to both followers, post to both completions, median of 200: {:.1} us",
        median_us(lats)
    );
    let chunk = vec![9u8; 64 << 10];
    let n = 128u64;
    let t = Instant::now();
    let mut posted = 0u64;
    let mut done = 0u64;
    while done < n {
        while posted < n {
            match fs[0].write(
                1,
                at + (posted as usize % 64) * chunk.len(),
                &chunk,
                5000 + posted,
            ) {
                Ok(()) => posted += 1,
                Err(FabricError::Busy) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        fs[0].flush().map_err(|e| e.to_string())?;
        evs[0].clear();
        fs[0].poll(&mut evs[0]);
        done += evs[0]
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    FabricEvent::Completion(Completion::Write { result: Ok(()), .. })
                )
            })
            .count() as u64;
        if t.elapsed() > Duration::from_secs(60) {
            return Err("throughput run stuck".into());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  info pipelined 64 KiB writes: {n} in {:.0} ms = {:.1} MB/s",
        secs * 1e3,
        (n as f64 * 65536.0) / 1e6 / secs
    );

    // The fence: followers move write permission to node 2.
    for f in [1usize, 2] {
        fs[f].set_writer(Some(2)).map_err(|e| e.to_string())?;
    }
    regions[1].write(at + 8192, &[0u8; 64]).unwrap();
    fs[0]
        .write(1, at + 8192, &[0xAB; 64], 200)
        .map_err(|e| e.to_string())?;
    fs[0].flush().map_err(|e| e.to_string())?;
    evs[0].clear();
    drive(&mut fs, &mut evs, "fenced write", |e| {
        write_result(&e[0], 200).is_some()
    })?;
    let r = write_result(&evs[0], 200).unwrap();
    let mut z = [0u8; 64];
    regions[1].read(at + 8192, &mut z).unwrap();
    check(
        r == Err(FabricError::PermissionDenied(1)) && z == [0u8; 64],
        &format!("deposed leader 0's write to follower 1 completes with {r:?}; no byte landed"),
    )?;
    check(
        matches!(
            fs[0].write(1, at, &[1u8; 8], 201),
            Err(FabricError::PermissionDenied(1))
        ),
        "further writes from 0 to 1 fail at once with PermissionDenied",
    )?;
    fs[2]
        .write(1, at + 8192, &[0xCD; 64], 202)
        .map_err(|e| e.to_string())?;
    fs[0]
        .write(1, layout::progress_offset(0), &pc.encode(), 203)
        .map_err(|e| e.to_string())?;
    fs[2].flush().map_err(|e| e.to_string())?;
    fs[0].flush().map_err(|e| e.to_string())?;
    drive(&mut fs, &mut evs, "new writer", |e| {
        write_result(&e[2], 202).is_some() && write_result(&e[0], 203).is_some()
    })?;
    regions[1].read(at + 8192, &mut z).unwrap();
    check(
        write_result(&evs[2], 202) == Some(Ok(())) && z == [0xCD; 64],
        "new writer 2's write to follower 1 lands",
    )?;
    check(
        write_result(&evs[0], 203) == Some(Ok(())),
        "fenced node 0 still writes its own progress cell at 1",
    )?;

    // Reconnect the fenced QP and grant 0 again: its writes land again.
    fs[0].reconnect(1).map_err(|e| e.to_string())?;
    let t = Instant::now();
    while fs[0].data_error(1).is_some() && t.elapsed() < Duration::from_secs(10) {
        for (f, e) in fs.iter_mut().zip(evs.iter_mut()) {
            f.poll(e);
        }
    }
    check(
        fs[0].data_error(1).is_none(),
        "data QP 0->1 reset and reconnected via control messages",
    )?;
    fs[1].set_writer(Some(0)).map_err(|e| e.to_string())?;
    fs[0]
        .write(1, at + 8192, &[0xEF; 64], 204)
        .map_err(|e| e.to_string())?;
    fs[0].flush().map_err(|e| e.to_string())?;
    evs[0].clear();
    drive(&mut fs, &mut evs, "write after regrant", |e| {
        write_result(&e[0], 204).is_some()
    })?;
    regions[1].read(at + 8192, &mut z).unwrap();
    check(
        write_result(&evs[0], 204) == Some(Ok(())) && z == [0xEF; 64],
        "after regrant, 0's write to 1 lands again",
    )?;

    // The fence under load: 0 keeps streaming while 1 revokes, then while 1 grants 2.
    fence_under_stream(&mut fs, &mut evs, None)?;
    fence_under_stream(&mut fs, &mut evs, Some(2))?;
    Ok(())
}

/// Each write of the stream fills its own 64-byte cell of the ring (4 MiB: 65536 cells);
/// the stream uses the first `CELLS`, the new writer the one after.
const CELL: usize = 64;
const CELLS: u64 = 1 << 15;
const TOKENS: u64 = 1 << 40;

fn cell_at(k: u64) -> usize {
    layout::RING_OFFSET + k as usize * CELL
}

/// Write `k`'s bytes: eight copies of a word carrying `k` (never zero).
fn pattern(k: u64) -> [u8; CELL] {
    let w = ((0x00BA_1107u64 << 40) | k).to_le_bytes();
    let mut b = [0; CELL];
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&w);
    }
    b
}

type Results = Vec<Option<Result<(), FabricError>>>;

/// The deposed leader's side: streams writes `0..CELLS` to node 1 (one cell each, at most
/// 64 outstanding, flushed every 8) until `stop`, then waits for every completion; spreads
/// its posts out once one has failed. Publishes in `posted` how many were posted,
/// before flushing them. Returns each write's result (a write refused at `write` time
/// counts as failed).
fn stream(f: &mut RdmaFabric, posted: &AtomicU64, stop: &AtomicBool) -> R<Results> {
    const WINDOW: u64 = 64;
    let mut results: Results = vec![None; CELLS as usize];
    let (mut next, mut done) = (0u64, 0u64);
    let mut failed = false;
    let mut evs = Vec::new();
    let start = Instant::now();
    while done < next || (next < CELLS && !stop.load(Ordering::Acquire)) {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("fence stream stuck at {done}/{next}"));
        }
        if !stop.load(Ordering::Acquire) {
            for _ in 0..8 {
                if next == CELLS || next - done >= WINDOW {
                    break;
                }
                match f.write(1, cell_at(next), &pattern(next), TOKENS + next) {
                    Ok(()) => {}
                    Err(FabricError::Busy) => break,
                    Err(e) => {
                        // Refused at once (the QP is broken after the fence).
                        results[next as usize] = Some(Err(e));
                        done += 1;
                        failed = true;
                    }
                }
                next += 1;
            }
            posted.store(next, Ordering::Release);
            f.flush().map_err(|e| e.to_string())?;
        }
        evs.clear();
        f.poll(&mut evs);
        for e in &evs {
            if let FabricEvent::Completion(Completion::Write {
                peer: 1,
                token,
                result,
            }) = e
            {
                if (TOKENS..TOKENS + CELLS).contains(token) {
                    let k = token - TOKENS;
                    if results[k as usize].replace(result.clone()).is_some() {
                        return Err(format!("write {k} completed twice"));
                    }
                    done += 1;
                    failed |= result.is_err();
                }
            }
        }
        if failed {
            // Fenced: refusals come at once, so pace the posts to keep them coming for the
            // whole time after the fence rather than in one burst.
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    Ok(results)
}

/// Deposed leader 0 keeps posting a stream of ring writes to follower 1 (on its own
/// thread) while 1 fences it with `set_writer(grant)`, and goes on for 200 ms (and at
/// least 2000 writes) after `set_writer` returned. Checks: the ring did not change after
/// a snapshot taken right after `set_writer` returned; each cell holds nothing or exactly
/// its own write; no write flushed after `set_writer` returned landed; exactly the writes
/// found in the snapshot completed Ok, every other one failed with PermissionDenied or
/// Disconnected. Leaves 0 granted at 1 again, with its data QP reconnected.
fn fence_under_stream(
    fs: &mut [RdmaFabric],
    evs: &mut [Vec<FabricEvent>],
    grant: Option<u8>,
) -> R<()> {
    const BEFORE: u64 = 200;
    const AFTER: u64 = 2000;
    const AFTER_TIME: Duration = Duration::from_millis(200);
    let region1 = fs[1].region().clone();
    let ring = || {
        let mut b = vec![0u8; CELLS as usize * CELL];
        region1.read(cell_at(0), &mut b).unwrap();
        b
    };
    region1
        .write(cell_at(0), &vec![0u8; CELLS as usize * CELL + CELL])
        .unwrap();
    let (posted, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let (leader, rest) = fs.split_first_mut().unwrap();
    let follower = &mut rest[0];
    let (streamed, snapshot, fence_posted) = std::thread::scope(|s| {
        let t = s.spawn(|| stream(leader, &posted, &stop));
        let start = Instant::now();
        // Fence once the stream is under way (spinning: on 2 vCPUs a sleep is too coarse).
        while region1.load_word_at(cell_at(BEFORE)) == Some(0)
            && !t.is_finished()
            && start.elapsed() < Duration::from_secs(30)
        {
            std::hint::spin_loop();
        }
        let fence = follower.set_writer(grant);
        // Every write from index `fence_posted` on was flushed after set_writer returned.
        let fence_posted = posted.load(Ordering::Acquire);
        let snapshot = ring();
        let at = Instant::now();
        while !t.is_finished() && start.elapsed() < Duration::from_secs(60) {
            let p = posted.load(Ordering::Acquire);
            if p == CELLS || (p >= fence_posted + AFTER && at.elapsed() >= AFTER_TIME) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        let streamed = t.join().map_err(|_| "stream thread panicked".to_string());
        (fence.map(|()| streamed), snapshot, fence_posted)
    });
    let results = streamed.map_err(|e| e.to_string())?.and_then(|r| r)?;
    let next = posted.into_inner();
    if region1.load_word_at(cell_at(BEFORE)) == Some(0) {
        return Err(format!(
            "fence {grant:?}: the stream ended before the fence"
        ));
    }
    let after = ring();
    let changed =
        (0..CELLS as usize).find(|&k| after[k * CELL..][..CELL] != snapshot[k * CELL..][..CELL]);
    check(
        changed.is_none(),
        &format!(
            "fence {grant:?}: the ring did not change after set_writer returned{}",
            changed.map_or(String::new(), |k| format!(" (cell {k} did)"))
        ),
    )?;
    let cell = |k: u64| &snapshot[k as usize * CELL..][..CELL];
    let landed = (0..CELLS).take_while(|&k| cell(k) == pattern(k)).count() as u64;
    let stray = (landed..CELLS).find(|&k| cell(k) != [0; CELL]);
    check(
        stray.is_none(),
        &format!(
            "fence {grant:?}: writes 0..{landed} landed whole before the fence, nothing else{}",
            stray.map_or(String::new(), |k| format!(" (cell {k} holds other bytes)"))
        ),
    )?;
    check(
        landed <= fence_posted,
        &format!(
            "fence {grant:?}: no write flushed after set_writer returned landed \
             ({landed} landed, {fence_posted} posted before)"
        ),
    )?;
    let ok = |k: u64| results[k as usize] == Some(Ok(()));
    let bad = (0..next).find(|&k| {
        ok(k) != (k < landed)
            || !(ok(k)
                || matches!(
                    results[k as usize],
                    Some(Err(
                        FabricError::PermissionDenied(1) | FabricError::Disconnected(1)
                    ))
                ))
    });
    check(
        bad.is_none(),
        &format!(
            "fence {grant:?}: exactly the {landed} landed writes completed Ok, the other {} \
             failed ({} posted before the fence, {} after){}",
            next - landed,
            fence_posted - landed,
            next - fence_posted,
            bad.map_or(String::new(), |k| format!(
                ": write {k} -> {:?}",
                results[k as usize]
            ))
        ),
    )?;
    if let Some(w) = grant {
        let w = w as usize;
        fs[w]
            .write(1, cell_at(CELLS), &pattern(CELLS), 300)
            .map_err(|e| e.to_string())?;
        fs[w].flush().map_err(|e| e.to_string())?;
        drive(fs, evs, "new writer after the fence", |e| {
            write_result(&e[w], 300).is_some()
        })?;
        let r = write_result(&evs[w], 300);
        let mut got = [0u8; CELL];
        region1.read(cell_at(CELLS), &mut got).unwrap();
        check(
            r == Some(Ok(())) && got == pattern(CELLS),
            &format!("fence {grant:?}: the new writer {w}'s write lands"),
        )?;
    }
    // Back to the start: 0's data QP reconnected, 0 granted at 1.
    fs[0].reconnect(1).map_err(|e| e.to_string())?;
    let t = Instant::now();
    while fs[0].data_error(1).is_some() && t.elapsed() < Duration::from_secs(10) {
        for (f, e) in fs.iter_mut().zip(evs.iter_mut()) {
            e.clear();
            f.poll(e);
        }
    }
    if fs[0].data_error(1).is_some() {
        return Err("data QP 0->1 did not reconnect after the fence".into());
    }
    fs[1].set_writer(Some(0)).map_err(|e| e.to_string())
}
