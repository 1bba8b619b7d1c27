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
use std::sync::Arc;
use std::time::{Duration, Instant};

type R<T> = Result<T, String>;

struct Args {
    dev: Option<String>,
    gid_index: Option<u32>,
    only: Option<String>,
}

fn parse() -> R<Args> {
    let mut a = Args {
        dev: None,
        gid_index: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--dev" => a.dev = Some(v()?),
            "--gid-index" => {
                a.gid_index = Some(v()?.parse().map_err(|e| format!("--gid-index: {e}"))?)
            }
            "--only" => a.only = Some(v()?),
            "-h" | "--help" => {
                println!(
                    "usage: verbs-selftest [--dev NAME] [--gid-index N] [--only verbs|fabric]"
                );
                std::process::exit(0)
            }
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
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
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("verbs-selftest: {e}");
            std::process::exit(2)
        }
    };
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

fn ballot_verbs_fabric_checks(_a: &Args) -> R<()> {
    Ok(())
}
