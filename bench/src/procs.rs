//! Topology `processes`: real `ballot-node` processes on 127.0.0.1, driven by client threads
//! through the pipelining client library (`ballot_node::pipeline`, `--outstanding` puts in
//! flight per connection), over the same TCP a deployment uses;
//! and `--endpoints`: the same client threads against an existing cluster.
//!
//! The processes are owned by a [`NodeCluster`] guard: dropping it stops them (SIGTERM, then
//! SIGKILL) and removes its temporary directory. The first Ctrl-C ends the run in order
//! (`interrupt`), so the guard does that too. Because the release profile aborts on panic
//! (no unwinding, so no `Drop`), the children are also killed from a panic hook, a SIGTERM
//! handler and a second Ctrl-C, and each child gets `PR_SET_PDEATHSIG = SIGKILL`, so they
//! die with the bench even on `kill -9`.

use crate::load::LoadOpts;
use crate::stats::{self, BenchResult};
use ballot_node::client::{self, Client, ClientConfig};
use ballot_node::config::loopback_peers;
use ballot_node::kv::Op;
use ballot_node::pipeline::Pipeline;
use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// The cores the nodes are pinned to: node `i` gets `--core ids[i % len]` (busy-polling);
/// empty: shared cores.
pub fn core_ids(o: &LoadOpts) -> Vec<usize> {
    o.cores.iter().map(|c| c.id).collect()
}

/// Pids of the running children, for the signal handler and the panic hook.
static PIDS: [AtomicI32; ballot::MAX_NODES] = [const { AtomicI32::new(0) }; ballot::MAX_NODES];

/// Kills every `ballot-node` child at once (signal handlers, panic hook).
pub fn kill_all_children() {
    for p in &PIDS {
        let pid = p.swap(0, Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe; the pid is our own child's.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    kill_all_children();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) }
}

fn install_cleanup_hooks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            kill_all_children();
            prev(info);
        }));
        // SIGINT is `interrupt`'s: the first stops the run in order (this guard then stops
        // the nodes), the second kills them and exits.
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe {
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
    });
}

/// `ballot-node` next to this binary (`target/<profile>/`), or `$BALLOT_NODE_BIN`.
pub fn find_node_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("BALLOT_NODE_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("BALLOT_NODE_BIN={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    // `target/<profile>/ballot-bench`, or `target/<profile>/deps/` for test binaries.
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let cand = d.join("ballot-node");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    let release = dir.ends_with("release") || dir.parent().is_some_and(|p| p.ends_with("release"));
    Err(format!(
        "--topology processes needs the ballot-node binary next to ballot-bench (looked in {}); \
         build it with `cargo build{} -p ballot-node`, or set BALLOT_NODE_BIN",
        dir.display(),
        if release { " --release" } else { "" }
    ))
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

/// Running `ballot-node` processes; dropping it stops them and removes the directory.
pub struct NodeCluster {
    pub client_addrs: Vec<String>,
    children: Vec<Child>,
    /// Logs and data dirs; removed after the children are stopped (fields drop after
    /// `Drop::drop`).
    dir: tempfile::TempDir,
}

impl NodeCluster {
    /// Starts `--replicas` nodes with the flags of `o` and `extra`.
    pub fn start(bin: &Path, o: &LoadOpts, extra: &[String]) -> Result<NodeCluster, String> {
        let (n, cores, durable) = (o.replicas, core_ids(o), o.durable());
        install_cleanup_hooks();
        let tmp = o.scratch_dir("nodes")?;
        let dir = tmp.path().to_path_buf();
        let fabric: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let clients: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        // A fresh key per run, handed over in the environment (never on a command line).
        let key = format!(
            "bench-{:016x}{:016x}",
            client::random_id(),
            client::random_id()
        );
        let mut c = NodeCluster {
            client_addrs: clients.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            children: Vec::new(),
            dir: tmp,
        };
        for i in 0..n {
            let log = std::fs::File::create(dir.join(format!("node{i}.log")))
                .map_err(|e| format!("cannot create a log file in {}: {e}", dir.display()))?;
            let mut cmd = Command::new(bin);
            cmd.args(["--node", &i.to_string(), "--cluster", "0xBE4C"])
                .args([
                    "--peers",
                    &loopback_peers(&fabric),
                    "--client-peers",
                    &loopback_peers(&clients),
                ])
                .args(["--client-addr", &c.client_addrs[i]])
                .args(["--durability", if durable { "durable" } else { "volatile" }])
                .arg("--data-dir")
                .arg(dir.join(format!("data{i}")))
                // Fresh data dirs: the cluster's first start.
                .args(["--initial-cluster-state", "new"])
                .args(extra)
                .env(ballot_node::config::KEY_ENV, &key)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            if !cores.is_empty() {
                cmd.args(["--core", &cores[i % cores.len()].to_string()]);
            }
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            PIDS[i].store(child.id() as i32, Ordering::SeqCst);
            c.children.push(child);
        }
        Ok(c)
    }

    /// Process id of node `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].id()
    }

    /// The last lines of node `i`'s log (for error messages).
    fn log_tail(&self, i: usize) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(format!("node{i}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n    ")
    }

    /// Waits until one node says it leads and a `put` through the client library succeeds.
    pub fn wait_ready(&mut self, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        loop {
            for (i, ch) in self.children.iter_mut().enumerate() {
                if let Ok(Some(st)) = ch.try_wait() {
                    return Err(format!(
                        "ballot-node {i} exited ({st}) during start-up:\n    {}",
                        self.log_tail(i)
                    ));
                }
            }
            let leader = self.client_addrs.iter().enumerate().find_map(|(i, a)| {
                client::status(a, Duration::from_millis(300))
                    .ok()
                    .filter(|s| s.role == "leader")
                    .map(|_| i)
            });
            if let Some(l) = leader {
                let mut cfg = ClientConfig::new(self.client_addrs.clone());
                cfg.deadline = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                if Client::with_config(cfg).put(b"bench-ready", b"1").is_ok() {
                    return Ok(l);
                }
            }
            if crate::interrupt::requested() {
                return Err("interrupted while the ballot-node cluster was starting".into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the ballot-node cluster did not serve within {within:?}; logs in {}",
                    self.dir.path().display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The leader's commit index, if a node at one of `addrs` says it leads.
fn leader_commit(addrs: &[String]) -> Option<u64> {
    addrs
        .iter()
        .filter_map(|a| client::status(a, Duration::from_millis(500)).ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.ballot)
        .map(|s| s.commit)
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        for c in &self.children {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        for p in &PIDS {
            p.store(0, Ordering::SeqCst);
        }
    }
}

struct Shared {
    stop: AtomicBool,
    /// Commands completed (for the progress lines), all phases.
    done: AtomicU64,
}

/// One client thread's tally of the measured window.
struct Tally {
    hist: Histogram<u64>,
    commits: u64,
    errors: u64,
}

/// One point on a fresh cluster: one result (three with `--idle-connections`).
pub fn run(o: &LoadOpts) -> Result<Vec<BenchResult>, String> {
    if o.replicas == 0 || o.replicas > ballot::MAX_NODES {
        return Err(format!("--replicas must be 1..={}", ballot::MAX_NODES));
    }
    if o.clients == 0 {
        return Err("--clients must be positive".into());
    }
    if o.payload > ballot_node::kv::MAX_VALUE {
        return Err(format!(
            "--payload must be at most {} with --topology processes (a put's value)",
            ballot_node::kv::MAX_VALUE
        ));
    }
    let bin = find_node_binary()?;
    if o.idle_connections > 0 {
        return run_with_idle_connections(&bin, o);
    }
    let mut cluster = NodeCluster::start(&bin, o, &[])?;
    cluster.wait_ready(Duration::from_secs(20))?;
    let mut r = drive(o, &cluster.client_addrs)?;
    drop(cluster);
    r.replicas = o.replicas;
    r.durability = o.durability_name();
    Ok(vec![r])
}

/// `--idle-connections N`: on one cluster, the load without idle connections, with `N`
/// idle ones open on the leader, and without them again; three results. Prints the
/// leader's threads and resident memory before and after the connections were opened.
fn run_with_idle_connections(bin: &Path, o: &LoadOpts) -> Result<Vec<BenchResult>, String> {
    let n = o.idle_connections;
    // This process holds the idle sockets and the clients' connections.
    let need = (n + o.clients + 256) as u64;
    let limit = raise_open_file_limit(need)?;
    // The leader holds them too; it raises its own limit to this + 256 if it can.
    let max = (n + o.clients + 64).to_string();
    let mut cluster = NodeCluster::start(bin, o, &["--client-max-connections".into(), max])?;
    let leader = cluster.wait_ready(Duration::from_secs(20))?;
    let pid = cluster.pid(leader);
    let mut out = Vec::new();
    let label = |mut r: BenchResult, idle: usize| {
        r.replicas = o.replicas;
        r.durability = o.durability_name();
        r.idle_connections = idle;
        r
    };
    eprintln!("phase 1/3: no idle connections");
    out.push(label(drive(o, &cluster.client_addrs)?, 0));
    let before = ProcUse::of(pid)?;
    let t = Instant::now();
    let mut idle = Vec::with_capacity(n);
    let addr = &cluster.client_addrs[leader];
    for k in 0..n {
        if crate::interrupt::requested() {
            return Err("interrupted while opening the idle connections".into());
        }
        let c = client::Conn::open(addr, Duration::from_secs(5), Duration::from_secs(5)).map_err(
            |e| {
                format!(
                    "idle connection {} of {n} to the leader ({addr}) failed: {e} (this \
                     process's open-file limit: {limit})",
                    k + 1
                )
            },
        )?;
        idle.push(c);
    }
    let opened = t.elapsed();
    // Let the node's loop settle (its buffers, the accept backlog) before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let during = ProcUse::of(pid)?;
    eprintln!(
        "{n} idle connections open on the leader (node {leader}) in {opened:.1?}: its threads \
         {} -> {}, resident memory {:.1} -> {:.1} MiB ({:.1} KiB per connection)",
        before.threads,
        during.threads,
        before.rss_kib as f64 / 1024.0,
        during.rss_kib as f64 / 1024.0,
        (during.rss_kib as f64 - before.rss_kib as f64) / n as f64
    );
    eprintln!("phase 2/3: {n} idle connections open");
    out.push(label(drive(o, &cluster.client_addrs)?, n));
    let still = ProcUse::of(pid)?;
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("phase 3/3: idle connections closed");
    out.push(label(drive(o, &cluster.client_addrs)?, 0));
    drop(cluster);
    let base = (out[0].throughput_ops_s + out[2].throughput_ops_s) / 2.0;
    eprintln!(
        "idle connections: {n} on the leader; throughput without {:.0} and {:.0}, with {:.0} \
         ops/s: {:.3}x the mean without ({:+.1} %); leader threads {} before, {} with them \
         (still {} after the loaded run)",
        out[0].throughput_ops_s,
        out[2].throughput_ops_s,
        out[1].throughput_ops_s,
        out[1].throughput_ops_s / base,
        (out[1].throughput_ops_s / base - 1.0) * 100.0,
        before.threads,
        during.threads,
        still.threads
    );
    Ok(out)
}

/// A process's threads and resident memory, from `/proc`.
struct ProcUse {
    threads: usize,
    rss_kib: u64,
}

impl ProcUse {
    fn of(pid: u32) -> Result<ProcUse, String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(ProcUse {
            threads: field("Threads:")? as usize,
            rss_kib: field("VmRSS:")?,
        })
    }
}

/// Raises this process's soft open-file limit to its hard limit (children inherit it);
/// the new soft limit, or an error if even the hard limit is below `need`.
fn raise_open_file_limit(need: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(format!(
                "getrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            ));
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    if lim.rlim_cur < need {
        return Err(format!(
            "--idle-connections needs about {need} open files in this process (the idle \
             connections, the clients' and some spare), but the open-file limit is {} (hard \
             limit {}): raise the hard limit (as root `ulimit -Hn {need}`, systemd \
             LimitNOFILE=, or /etc/security/limits.conf) or open fewer",
            lim.rlim_cur, lim.rlim_max
        ));
    }
    Ok(lim.rlim_cur)
}

/// Drives an existing cluster (`--endpoints`): the nodes at `addrs` (their client
/// addresses), which run elsewhere and are left running.
pub fn run_endpoints(o: &LoadOpts, addrs: &[String]) -> Result<BenchResult, String> {
    if o.payload > ballot_node::kv::MAX_VALUE {
        return Err(format!(
            "--payload must be at most {} with --endpoints (a put's value)",
            ballot_node::kv::MAX_VALUE
        ));
    }
    let mut errs = Vec::new();
    for a in addrs {
        match client::status(a, Duration::from_secs(2)) {
            Ok(_) => {}
            Err(e) => errs.push(format!("{a}: {e}")),
        }
    }
    if errs.len() == addrs.len() {
        return Err(format!("no endpoint answered: {}", errs.join("; ")));
    }
    for e in &errs {
        eprintln!("warning: endpoint {e}");
    }
    let mut r = drive(o, addrs)?;
    r.topology = "external";
    r.replicas = addrs.len();
    r.durability = o.durability.map_or("unknown", |_| o.durability_name());
    Ok(r)
}

/// `--clients` client threads, each keeping `--outstanding` puts in flight on one
/// connection through the pipelining client library ([`Pipeline`]), to the nodes at
/// `addrs`, for the warm-up and the measured window (shorter if interrupted).
fn drive(o: &LoadOpts, addrs: &[String]) -> Result<BenchResult, String> {
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
    });
    let t0 = Instant::now() + Duration::from_millis(20);
    let warm_end = t0 + o.measure.warmup;
    let end = warm_end + o.measure.duration;
    let tallies = Arc::new(Mutex::new(Vec::<Tally>::new()));
    let mut threads = Vec::new();
    for c in 0..o.clients {
        let (addrs, sh, tallies) = (addrs.to_vec(), shared.clone(), tallies.clone());
        let value = vec![0xA5u8; o.payload];
        let depth = o.outstanding.max(1);
        // Open loop: client c sends at t0 + (c + k * clients) / rate.
        let gap = o
            .open_loop
            .map(|r| Duration::from_secs_f64(o.clients as f64 / r.max(1e-3)));
        let offset = o
            .open_loop
            .map(|r| Duration::from_secs_f64(c as f64 / r.max(1e-3)))
            .unwrap_or_default();
        let spawn = std::thread::Builder::new()
            .name(format!("client-{c}"))
            .spawn(move || {
                // One connection per client thread, `depth` puts in flight on it.
                let mut cl = Pipeline::new(ClientConfig::new(addrs), depth);
                let key = (c as u64).to_le_bytes();
                let put = || Op::Put {
                    key: key.to_vec(),
                    value: value.clone(),
                };
                let mut started: FxHashMap<u64, Instant> = FxHashMap::default();
                let mut t = Tally {
                    hist: stats::histogram(),
                    commits: 0,
                    errors: 0,
                };
                let mut intended = t0 + offset;
                loop {
                    let now = Instant::now();
                    if now >= end || sh.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Keep `depth` in flight; open loop: each at its intended time (the
                    // latency counts from then, waiting for room included).
                    let wait = match gap {
                        Some(g) => {
                            while intended <= now && intended < end && cl.outstanding() < depth {
                                started.insert(cl.submit(put()), intended);
                                intended += g;
                            }
                            intended
                                .saturating_duration_since(now)
                                .min(Duration::from_millis(10))
                        }
                        None => {
                            while cl.outstanding() < depth {
                                started.insert(cl.submit(put()), now);
                            }
                            Duration::from_millis(10)
                        }
                    };
                    // The first completion may wait; the rest of the loop takes those
                    // read with it, which arrived at the same time: one clock read.
                    let mut wait = wait;
                    let mut done = now;
                    while let Some((tag, r)) = cl.poll(wait) {
                        if !wait.is_zero() {
                            done = Instant::now();
                        }
                        wait = Duration::ZERO;
                        let from = started.remove(&tag).unwrap_or(done);
                        sh.done.fetch_add(1, Ordering::Relaxed);
                        // Count commands sent in the measured window and completed in it.
                        if from >= warm_end && done <= end {
                            if r.is_ok() {
                                let _ = t.hist.record((done - from).as_nanos().max(1) as u64);
                                t.commits += 1;
                            } else {
                                t.errors += 1;
                            }
                        }
                    }
                }
                tallies.lock().expect("tallies").push(t);
            });
        match spawn {
            Ok(h) => threads.push(h),
            Err(e) => {
                shared.stop.store(true, Ordering::SeqCst);
                for h in threads {
                    let _ = h.join();
                }
                return Err(format!("cannot start a client thread: {e}"));
            }
        }
    }
    // Progress, and the leader's commit index at the window's edges (commands per entry).
    let mut commit_at_start = None;
    let mut ticker = stats::Ticker::new(o.progress(), t0, "warm-up");
    let mut last_done = 0u64;
    let mut line = |t: Option<stats::Tick>| {
        if let Some(t) = t {
            let d = shared.done.load(Ordering::Relaxed);
            eprintln!(
                "{} {:>10.0} commits/s",
                t.head(),
                (d - last_done) as f64 / t.secs
            );
            last_done = d;
        }
    };
    let mut stopped_at = end;
    while Instant::now() < end {
        let now = Instant::now();
        if crate::interrupt::requested() {
            stopped_at = now;
            shared.stop.store(true, Ordering::SeqCst);
            break;
        }
        if commit_at_start.is_none() && now >= warm_end {
            commit_at_start = leader_commit(addrs);
        }
        line(ticker.due(
            now,
            if now >= warm_end {
                "measure"
            } else {
                "warm-up"
            },
        ));
        std::thread::sleep(
            Duration::from_millis(5).min(end.saturating_duration_since(Instant::now())),
        );
    }
    let commit_at_end = leader_commit(addrs);
    for h in threads {
        let _ = h.join();
    }
    line(ticker.finish(stopped_at.min(Instant::now())));
    let mut total = stats::histogram();
    let (mut commits, mut errors) = (0u64, 0u64);
    for t in tallies.lock().expect("tallies").iter() {
        let _ = total.add(&t.hist);
        commits += t.commits;
        errors += t.errors;
    }
    let secs = stopped_at.saturating_duration_since(warm_end).as_secs_f64();
    let entries = match (commit_at_start, commit_at_end) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    let mut r = BenchResult {
        kind: "cluster",
        fabric: "tcp".into(),
        topology: "processes",
        replicas: o.replicas,
        payload: o.payload,
        // Open loop too: the client threads that carried the arrivals.
        clients: o.clients,
        outstanding: o.outstanding.max(1),
        pipeline: ballot::protocol::Config::new(0, vec![0], ballot_node::server::ring(), 0).window,
        batch_bytes: ballot_node::kv::MAX_COMMAND + 64,
        open_loop_rate: o.open_loop,
        duration_s: secs,
        partial: stopped_at < end,
        commits,
        errors,
        throughput_ops_s: if secs > 0.0 {
            commits as f64 / secs
        } else {
            0.0
        },
        // Commands per entry counts all the window's commits against all its entries
        // (entries also carry the commands that straddle the window's edges).
        commands_per_entry: entries.map(|e| commits as f64 / e as f64),
        ..Default::default()
    };
    r.fill_latency(&total);
    Ok(r)
}
