//! The client port of real `ballot-node` processes over real sockets: pipelining (many
//! requests in flight on one connection, answered as they complete), and each limit
//! (connections, frame size, idle time, unread answers) refused with a clear error while
//! the node keeps serving others; a client of the old protocol gets a clear error.

mod common;

use ballot_node::client::Conn;
use ballot_node::kv::{Command, KvResult, Op};
use ballot_node::pipeline::Pipeline;
use ballot_node::wire::{self, kind, Request, Response};
use common::Cluster;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn command(client: u64, seq: u64, op: Op) -> Vec<u8> {
    Request::Command(Command { client, seq, op }.encode()).encode()
}

fn open(addr: &str) -> Conn {
    Conn::open(addr, Duration::from_secs(2), Duration::from_secs(5)).expect("connect")
}

/// A GET through a fresh connection.
fn get(addr: &str, key: &[u8]) -> KvResult {
    let r = open(addr)
        .call(&command(0, 0, Op::Get { key: key.to_vec() }))
        .unwrap();
    match r {
        Response::Ok(b) => KvResult::decode(&b).unwrap(),
        other => panic!("GET answered {other:?}"),
    }
}

/// A raw socket past the hello.
fn raw(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&wire::ClientHello { version: 2 }.encode())
        .unwrap();
    let mut h = [0u8; wire::ServerHello::LEN];
    s.read_exact(&mut h).unwrap();
    let h = wire::ServerHello::decode(&h).expect("a server hello");
    assert_eq!(h.version, 2);
    s
}

/// Reads one v2 frame: (id, response).
fn read_v2(s: &mut TcpStream) -> std::io::Result<(u64, Response)> {
    let body = wire::read_frame(s)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let (id, b) = wire::split_id(&body)?;
    Ok((id, Response::decode(b).unwrap()))
}

/// The node closes `s` (after what it sent): EOF or a reset within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// Many requests in flight on one connection: all sent before any answer is read, each
/// answered once under its id, STATUS answered ahead of commands sent before it (answers
/// come as they complete, not in request order); and the pipelining client runs many
/// writes and reads through followers (redirects) to the right results.
#[test]
fn many_requests_in_flight_on_one_connection() {
    let cl = Cluster::serving(3, "pipelined", &[]);
    let leader = cl.leader_addr();
    let mut c = open(&leader);
    assert!(c.hello.max_in_flight >= 256);
    // Register a session.
    let reg = c.call(&command(0, 0, Op::Register)).unwrap();
    let Response::Ok(b) = reg else {
        panic!("register: {reg:?}")
    };
    let KvResult::Session(sid) = KvResult::decode(&b).unwrap() else {
        panic!("register answered {b:?}")
    };
    // 120 puts (in the session's window of 128), every 10th followed by a STATUS; one write.
    let mut frames = Vec::new();
    let mut ids = Vec::new();
    let mut status_ids = Vec::new();
    for i in 1..=120u64 {
        let put = Op::Put {
            key: format!("k{i}").into_bytes(),
            value: i.to_le_bytes().to_vec(),
        };
        ids.push(c.frame(&mut frames, &command(sid, i, put)));
        if i % 10 == 0 {
            status_ids.push(c.frame(&mut frames, &Request::Status.encode()));
        }
    }
    c.write(&frames).unwrap();
    let mut order = Vec::new();
    while order.len() < ids.len() + status_ids.len() {
        let (id, r) = c.recv().unwrap();
        assert!(!order.contains(&id), "id {id} answered twice");
        match r {
            Response::Ok(b) if status_ids.contains(&id) => {
                wire::NodeStatus::decode(&b).unwrap();
            }
            Response::Ok(b) => assert_eq!(KvResult::decode(&b).unwrap(), KvResult::Ok),
            other => panic!("request {id}: {other:?}"),
        }
        order.push(id);
    }
    // The last STATUS (sent after every put) was answered before some put sent before it.
    let last_status = *status_ids.last().unwrap();
    let pos = order.iter().position(|&i| i == last_status).unwrap();
    assert!(
        order[pos + 1..].iter().any(|i| ids.contains(i)),
        "answers came in request order only: {order:?}"
    );
    // The pipelining client: 1000 writes 64 deep, sent to a follower first (redirects).
    let mut cfg = cl.cfg();
    let follower = cl.addrs().into_iter().find(|a| *a != leader).unwrap();
    cfg.addrs = vec![follower, leader.clone()];
    let mut p = Pipeline::new(cfg, 64);
    let ops: Vec<Op> = (0..1000u64)
        .map(|i| Op::Put {
            key: format!("p{}", i % 50).into_bytes(),
            value: i.to_le_bytes().to_vec(),
        })
        .collect();
    let t = Instant::now();
    for r in p.execute_all(ops) {
        assert_eq!(r, Ok(KvResult::Ok));
    }
    eprintln!("1000 pipelined puts in {:?}", t.elapsed());
    let gets: Vec<Op> = (0..50u64)
        .map(|k| Op::Get {
            key: format!("p{k}").into_bytes(),
        })
        .collect();
    for (k, r) in p.execute_all(gets).into_iter().enumerate() {
        // The last write of key k was i = 950 + k.
        assert_eq!(
            r,
            Ok(KvResult::Value((950 + k as u64).to_le_bytes().to_vec()))
        );
    }
    // A retried write (same session and sequence number) takes effect once.
    let mut c2 = open(&leader);
    let again = c2
        .call(&command(
            sid,
            120,
            Op::Put {
                key: b"k120".to_vec(),
                value: b"other".to_vec(),
            },
        ))
        .unwrap();
    assert_eq!(again, Response::Ok(KvResult::Ok.encode()));
    let got = c2
        .call(&command(
            0,
            0,
            Op::Get {
                key: b"k120".to_vec(),
            },
        ))
        .unwrap();
    assert_eq!(
        got,
        Response::Ok(KvResult::Value(120u64.to_le_bytes().to_vec()).encode())
    );
}

/// One connection past `--client-max-connections` is told so, clearly, and closed; once
/// one closes, a new one is served.
#[test]
fn connection_limit_is_refused_with_a_clear_error() {
    let cl = Cluster::serving(1, "connlimit", &["--client-max-connections", "3"]);
    let a = &cl.addrs()[0];
    // The cluster's own readiness probe closed its connection; wait until it is gone.
    std::thread::sleep(Duration::from_millis(200));
    let mut held: Vec<Conn> = (0..3).map(|_| open(a)).collect();
    for c in &mut held {
        assert!(matches!(
            c.call(&Request::Status.encode()),
            Ok(Response::Ok(_))
        ));
    }
    let e = Conn::open(a, Duration::from_secs(2), Duration::from_secs(5)).unwrap_err();
    assert!(
        e.to_string().contains("too many connections") && e.to_string().contains("at most 3"),
        "{e}"
    );
    // The CLI's view: a clear error naming the limit.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Conn::open(a, Duration::from_secs(2), Duration::from_secs(5)) {
            Ok(mut c) => {
                assert!(matches!(
                    c.call(&Request::Status.encode()),
                    Ok(Response::Ok(_))
                ));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("too many connections"), "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("a slot did not free up: {e}"),
        }
    }
}

/// Bad input on the client port: a frame over `--client-max-frame`, a 4 GiB length, a
/// frame shorter than its header, a duplicate request id in flight: each a GOAWAY naming
/// the problem, then the connection closes. An unknown request kind and a malformed command
/// are errors for that request only. Random bytes instead of a hello: closed. The node
/// serves others throughout.
#[test]
fn bad_frames_are_refused_and_the_node_keeps_serving() {
    let cl = Cluster::serving(1, "frames", &["--client-max-frame", "1K"]);
    let a = cl.addrs()[0].clone();
    let goaway = |header: &[u8], want: &str| {
        let mut s = raw(&a);
        s.write_all(header).unwrap();
        let (id, r) = read_v2(&mut s).unwrap();
        assert_eq!(id, 0);
        match r {
            Response::GoAway(why) => assert!(why.contains(want), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(closed_within(&mut s, Duration::from_secs(3)), "not closed");
    };
    let mut big = (2000u32).to_le_bytes().to_vec();
    big.extend_from_slice(&7u64.to_le_bytes());
    big.push(kind::COMMAND);
    goaway(
        &big,
        "frame of 2000 bytes exceeds this node's limit of 1024",
    );
    goaway(&u32::MAX.to_le_bytes(), "exceeds");
    goaway(&[3, 0, 0, 0, 1, 2, 3], "shorter than its 9-byte header");
    // Unknown kind and a bad command: an error for that id; the connection goes on.
    let mut s = raw(&a);
    let mut f = Vec::new();
    wire::put_frame(&mut f, 5, &[99]);
    wire::put_frame(&mut f, 6, &[kind::COMMAND, 1, 2, 3]);
    wire::put_frame(&mut f, 7, &[kind::STATUS]);
    s.write_all(&f).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(read_v2(&mut s).unwrap());
    }
    got.sort_by_key(|(id, _)| *id);
    assert!(matches!(&got[0], (5, Response::Error(e)) if e.contains("unknown request kind 99")));
    assert!(matches!(&got[1], (6, Response::Error(e)) if e.contains("bad command")));
    assert!(matches!(&got[2], (7, Response::Ok(_))));
    // A duplicate id while the first is in flight (a write through the log takes a while;
    // the second frame follows in the same segment).
    let mut f = Vec::new();
    let put = command(
        0,
        0,
        Op::Put {
            key: b"d".to_vec(),
            value: b"1".to_vec(),
        },
    );
    let other = command(
        0,
        0,
        Op::Put {
            key: b"e".to_vec(),
            value: b"1".to_vec(),
        },
    );
    wire::put_frame(&mut f, 9, &put);
    wire::put_frame(&mut f, 9, &other);
    s.write_all(&f).unwrap();
    let mut saw = false;
    for _ in 0..2 {
        match read_v2(&mut s) {
            Ok((0, Response::GoAway(why))) => {
                assert!(why.contains("duplicate request id 9"), "{why}");
                saw = true;
                break;
            }
            Ok((9, _)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(saw, "no GOAWAY for a duplicate id");
    // The duplicate was not applied.
    assert_eq!(get(&a, b"e"), KvResult::NotFound);
    // Random bytes where the hello goes: not a v2 hello, read as a v1 frame: closed.
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5])
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(12)));
    // Still serving.
    let mut c = open(&a);
    assert!(matches!(
        c.call(&Request::Status.encode()),
        Ok(Response::Ok(_))
    ));
}

/// Truncated input: a frame cut short by the client closing its side (the request before
/// it is answered, then the node closes; the cut one is never applied), a frame cut short
/// and then nothing (closed at the idle time-out), and hellos cut short (closed). The node
/// serves others throughout.
#[test]
fn truncated_frames_are_never_applied() {
    let cl = Cluster::serving(1, "truncated", &["--client-idle-timeout-ms", "800"]);
    let a = cl.addrs()[0].clone();
    let put = |key: &[u8]| {
        command(
            0,
            0,
            Op::Put {
                key: key.to_vec(),
                value: vec![7; 100],
            },
        )
    };
    // A whole PUT, then half of one, then the client's side closes.
    let mut s = raw(&a);
    let mut f = Vec::new();
    wire::put_frame(&mut f, 1, &put(b"whole"));
    let whole = f.len();
    wire::put_frame(&mut f, 2, &put(b"cut"));
    let cut = whole + (f.len() - whole) / 2;
    s.write_all(&f[..cut]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (id, r) = read_v2(&mut s).unwrap();
    assert_eq!((id, r), (1, Response::Ok(KvResult::Ok.encode())));
    assert!(closed_within(&mut s, Duration::from_secs(3)), "not closed");
    // Half a frame, and the client stays silent: the idle time-out closes it.
    let mut s = raw(&a);
    let mut f = Vec::new();
    wire::put_frame(&mut f, 3, &put(b"stalled"));
    s.write_all(&f[..f.len() - 10]).unwrap();
    let t = Instant::now();
    let (id, r) = read_v2(&mut s).unwrap();
    assert_eq!(id, 0);
    assert!(
        matches!(&r, Response::GoAway(w) if w.contains("idle")),
        "{r:?}"
    );
    assert!(closed_within(&mut s, Duration::from_secs(3)), "not closed");
    eprintln!("a stalled half frame was closed after {:?}", t.elapsed());
    // Hellos cut short: closed at EOF, or at the hello time-out if the client stays.
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"BAL").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)), "not closed");
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(&wire::ClientHello { version: 2 }.encode()[..6])
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)), "not closed");
    // Applied: the whole put only.
    assert_eq!(get(&a, b"whole"), KvResult::Value(vec![7; 100]));
    assert_eq!(get(&a, b"cut"), KvResult::NotFound);
    assert_eq!(get(&a, b"stalled"), KvResult::NotFound);
}

/// A small xorshift generator for the random-input tests (seeded: a failure replays).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Random input after the hello. Well-framed requests of random kinds with random bodies,
/// and valid commands with bytes flipped, cut or added: each answered exactly once, under
/// its id, with what the node's own validation says (an error for what is malformed, a
/// result for what is a command); the connection goes on. Unframed random bytes on forty
/// connections: each gets a GOAWAY or is closed once the client closes its side. The node
/// serves others throughout.
#[test]
fn random_input_gets_errors_or_a_closed_connection() {
    let cl = Cluster::serving(1, "random", &[]);
    let a = cl.addrs()[0].clone();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let valid: Vec<Vec<u8>> = vec![
        Command {
            client: 0,
            seq: 0,
            op: Op::Put {
                key: b"rk".to_vec(),
                value: b"rv".to_vec(),
            },
        }
        .encode(),
        Command {
            client: 0,
            seq: 0,
            op: Op::Cas {
                key: b"rk".to_vec(),
                expected: Some(b"rv".to_vec()),
                new: b"rw".to_vec(),
            },
        }
        .encode(),
        Command {
            client: 0,
            seq: 0,
            op: Op::Get {
                key: b"rk".to_vec(),
            },
        }
        .encode(),
    ];
    let mut s = raw(&a);
    let mut bodies: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let mut f = Vec::new();
    for id in 1..=500u64 {
        let body = match rng.below(4) {
            // Any kind, random body.
            0 => {
                let n = rng.below(40) as usize;
                rng.bytes(1 + n)
            }
            // A command of random bytes.
            1 => {
                let n = rng.below(60) as usize;
                let mut b = vec![kind::COMMAND];
                b.extend(rng.bytes(n));
                b
            }
            // A valid command with a few bytes flipped, cut short or extended.
            _ => {
                let mut c = valid[rng.below(valid.len() as u64) as usize].clone();
                match rng.below(3) {
                    0 => {
                        for _ in 0..1 + rng.below(3) {
                            let i = rng.below(c.len() as u64) as usize;
                            c[i] ^= 1 << rng.below(8);
                        }
                    }
                    1 => c.truncate(rng.below(c.len() as u64) as usize),
                    _ => {
                        let n = 1 + rng.below(8) as usize;
                        c.extend(rng.bytes(n));
                    }
                }
                let mut b = vec![kind::COMMAND];
                b.extend(c);
                b
            }
        };
        wire::put_frame(&mut f, id, &body);
        bodies.insert(id, body);
    }
    s.write_all(&f).unwrap();
    let mut answered = std::collections::HashSet::new();
    let mut applied = 0;
    while answered.len() < bodies.len() {
        let (id, r) = read_v2(&mut s).expect("an answer to every request");
        assert!(answered.insert(id), "request {id} answered twice");
        let body = &bodies[&id];
        let (k, rest) = (body[0], &body[1..]);
        match (k, r) {
            (kind::COMMAND, Response::Ok(res)) => {
                assert!(Command::validate(rest).is_ok(), "{body:?} was applied");
                KvResult::decode(&res).expect("a result");
                applied += 1;
            }
            (kind::COMMAND, Response::Error(e)) => {
                assert!(Command::validate(rest).is_err(), "{body:?}: {e}");
                assert!(e.contains("bad command"), "{e}");
            }
            (kind::STATUS, Response::Ok(_)) | (kind::CHECKPOINT, Response::Ok(_)) => {
                assert!(rest.is_empty(), "{body:?}")
            }
            (_, Response::Error(e)) => assert!(e.contains("bad request"), "{e}"),
            (_, other) => panic!("request {id} {body:?} answered {other:?}"),
        }
    }
    eprintln!("500 random requests answered, {applied} of them valid commands");
    // Still open: a STATUS on the same connection.
    let mut f = Vec::new();
    wire::put_frame(&mut f, 1000, &Request::Status.encode());
    s.write_all(&f).unwrap();
    assert!(matches!(read_v2(&mut s), Ok((1000, Response::Ok(_)))));
    // Unframed random bytes after the hello.
    for _ in 0..40 {
        let mut s = raw(&a);
        let n = 1 + rng.below(3000) as usize;
        let junk = rng.bytes(n);
        // The node may close before it read everything: a reset here is fine.
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "not closed after {n} random bytes"
        );
    }
    let mut c = open(&a);
    assert!(matches!(
        c.call(&Request::Status.encode()),
        Ok(Response::Ok(_))
    ));
}

/// A connection idle past `--client-idle-timeout-ms` gets a GOAWAY saying so and is closed;
/// one that keeps talking is not.
#[test]
fn idle_connection_is_closed() {
    let cl = Cluster::serving(1, "idle", &["--client-idle-timeout-ms", "600"]);
    let a = &cl.addrs()[0];
    let mut idle = raw(a);
    let mut busy = open(a);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        assert!(matches!(
            busy.call(&Request::Status.encode()),
            Ok(Response::Ok(_))
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (id, r) = read_v2(&mut idle).unwrap();
    assert_eq!(id, 0);
    assert!(
        matches!(&r, Response::GoAway(w) if w.contains("idle for 600 ms")),
        "{r:?}"
    );
    assert!(closed_within(&mut idle, Duration::from_secs(3)));
}

/// A client that sends many reads of a large value and never reads the answers is cut
/// off once more than `--client-max-output` is waiting for it; meanwhile another client
/// goes on committing, unhindered.
#[test]
fn client_that_never_reads_is_cut_off_without_stalling_others() {
    let cl = Cluster::serving(1, "noread", &["--client-max-output", "2M"]);
    let a = cl.addrs()[0].clone();
    let big = vec![0x5Au8; 512 << 10];
    let mut p = Pipeline::new(cl.cfg(), 8);
    let r = p.execute_all(vec![Op::Put {
        key: b"big".to_vec(),
        value: big.clone(),
    }]);
    assert_eq!(r[0], Ok(KvResult::Ok));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    // The good client: puts, 16 in flight, until stopped.
    let good = {
        let (stop, done, cfg) = (stop.clone(), done.clone(), cl.cfg());
        std::thread::spawn(move || {
            let mut p = Pipeline::new(cfg, 16);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                while p.outstanding() < 16 {
                    i += 1;
                    p.submit(Op::Put {
                        key: format!("g{}", i % 100).into_bytes(),
                        value: i.to_le_bytes().to_vec(),
                    });
                }
                if let Some((_, r)) = p.poll(Duration::from_millis(100)) {
                    assert_eq!(r, Ok(KvResult::Ok));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The bad client: 200 GETs of 512 KiB (100 MiB of answers), never reading.
    let mut bad = raw(&a);
    let mut f = Vec::new();
    for id in 1..=200u64 {
        wire::put_frame(
            &mut f,
            id,
            &command(
                0,
                0,
                Op::Get {
                    key: b"big".to_vec(),
                },
            ),
        );
    }
    bad.write_all(&f).unwrap();
    let before = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    let during = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    good.join().unwrap();
    assert!(
        during > 50,
        "the other client stalled: {during} commits in 2 s"
    );
    // The bad client's connection is closed: reading now ends (EOF or reset) well before
    // the 100 MiB of answers.
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    bad.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let ended = loop {
        match bad.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => total += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break false
            }
            Err(_) => break true,
        }
    };
    assert!(ended, "the connection was not cut ({total} bytes read)");
    assert!(total < 50 << 20, "{total} bytes of answers were delivered");
    eprintln!("cut off after {total} bytes; the other client committed {during} in 2 s");
}

/// A client of the old protocol (no hello, `len | body` frames) gets a version 1 ERROR
/// frame saying the node speaks version 2, then the connection closes.
#[test]
fn old_protocol_client_gets_a_clear_error() {
    let cl = Cluster::serving(1, "v1", &[]);
    let mut s = TcpStream::connect(&cl.addrs()[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A v1 STATUS request.
    wire::write_frame(&mut s, &Request::Status.encode()).unwrap();
    let body = wire::read_frame(&mut s).unwrap().expect("an answer");
    match Response::decode(&body).unwrap() {
        Response::Error(why) => {
            assert!(why.contains("client protocol version 2"), "{why}");
            assert!(why.contains("version 1"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    // A hello of an unknown older version: a server hello of version 0, then a GOAWAY.
    let mut s = TcpStream::connect(&cl.addrs()[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&wire::ClientHello { version: 1 }.encode())
        .unwrap();
    let mut h = [0u8; wire::ServerHello::LEN];
    s.read_exact(&mut h).unwrap();
    assert_eq!(wire::ServerHello::decode(&h).unwrap().version, 0);
    let (id, r) = read_v2(&mut s).unwrap();
    assert_eq!(id, 0);
    assert!(matches!(r, Response::GoAway(w) if w.contains("version 2")));
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// A thousand open connections hold no thread each: the node's thread count does not move,
/// and a client on one more connection still commits.
#[test]
fn many_connections_hold_no_thread_each() {
    let cl = Cluster::serving(1, "conns", &[]);
    let a = cl.addrs()[0].clone();
    let pid = cl.pid(0);
    let before = threads(pid);
    let conns: Vec<Conn> = (0..1000).map(|_| open(&a)).collect();
    let during = threads(pid);
    assert!(
        during <= before + 2,
        "threads grew from {before} to {during} with 1000 connections"
    );
    let mut p = Pipeline::new(cl.cfg(), 32);
    let ops = (0..200u64)
        .map(|i| Op::Put {
            key: format!("c{i}").into_bytes(),
            value: vec![1],
        })
        .collect();
    assert!(p.execute_all(ops).iter().all(|r| *r == Ok(KvResult::Ok)));
    drop(conns);
    eprintln!("{before} threads before, {during} with 1000 connections open");
}

/// The pipelining client rides out a kill -9 of the leader: 32 writes in flight, each
/// resent (same session and sequence number) to the new leader; every write it
/// acknowledged is there afterwards.
#[test]
fn pipelined_writes_survive_a_leader_kill() {
    let mut cl = Cluster::serving(3, "failover", &[]);
    let li = cl.leader();
    let mut p = Pipeline::new(cl.cfg(), 32);
    let mut acked = Vec::new();
    let mut tags = std::collections::HashMap::new();
    let mut next = 0u64;
    let t = Instant::now();
    let mut killed = false;
    while acked.len() < 3000 {
        while p.outstanding() < 32 {
            let k = format!("f{next}");
            tags.insert(
                p.submit(Op::Put {
                    key: k.clone().into_bytes(),
                    value: next.to_le_bytes().to_vec(),
                }),
                next,
            );
            next += 1;
        }
        if let Some((tag, r)) = p.poll(Duration::from_millis(100)) {
            assert_eq!(r, Ok(KvResult::Ok), "write {}", tags[&tag]);
            acked.push(tags[&tag]);
        }
        if !killed && acked.len() >= 1000 {
            cl.kill9(li);
            killed = true;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stuck at {}",
            acked.len()
        );
    }
    let gets = acked
        .iter()
        .map(|n| Op::Get {
            key: format!("f{n}").into_bytes(),
        })
        .collect();
    for (n, r) in acked.iter().zip(p.execute_all(gets)) {
        assert_eq!(r, Ok(KvResult::Value(n.to_le_bytes().to_vec())), "f{n}");
    }
}
