//! Scripted schedules over the real `Core`: the four ways to lose a chosen value that were
//! found on d8653ac (issue 10), kept as regression tests. The harness executes actions as
//! `Replica::execute_one` does (driver.rs), with a real `Region` and `RingReader` per node,
//! and lets the test choose exactly when each message is delivered, each one-sided
//! operation lands, and each completion returns. Where the fixed protocol no longer takes
//! the step that lost the value, the test checks the step it takes instead, then heals the
//! cluster and checks agreement and that the chosen value survives.

use ballot::fabric::{Completion, FabricError};
use ballot::layout::{
    self, classify_remote_write, CommitCell, ProgressCell, RegionInfo, RingGeometry, WriteTarget,
};
use ballot::protocol::{Action, Config, Core, Durability, Msg};
use ballot::region::Region;
use ballot::ring::RingReader;
use ballot::{Index, NodeId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

#[derive(Debug)]
enum Op {
    Write {
        offset: usize,
        data: Vec<u8>,
        token: u64,
    },
    Read {
        offset: usize,
        len: usize,
        token: u64,
    },
}

struct Node {
    core: Core,
    region: Arc<Region>,
    reader: RingReader,
    writer: Option<NodeId>,
    applied: BTreeMap<Index, Vec<u8>>,
    seen_commit: Option<CommitCell>,
    seen_progress: Vec<Option<ProgressCell>>,
    /// The image a pending install restores (index -> payload).
    staged: BTreeMap<Index, Vec<u8>>,
    /// The newest checkpoint kept here: its index and image.
    ckpt: Option<(Index, BTreeMap<Index, Vec<u8>>)>,
}

struct Cluster {
    n: usize,
    geo: RingGeometry,
    nodes: Vec<Node>,
    up: Vec<bool>,
    incarnations: Vec<u64>,
    msgs: Vec<(NodeId, NodeId, Vec<u8>)>,
    ops: BTreeMap<(NodeId, NodeId), VecDeque<Op>>,
    done: BTreeMap<(NodeId, NodeId), VecDeque<Completion>>,
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Every Apply of every incarnation: (node, index, payload).
    history: Vec<(NodeId, Index, Vec<u8>)>,
    ticket: u64,
    log: bool,
}

fn payload(entry: &[u8]) -> Vec<u8> {
    let (_, p) = layout::decode_entry(entry).expect("valid entry");
    p.to_vec()
}

impl Cluster {
    fn cfg(&self, id: NodeId) -> Config {
        let seed = 1000 + u64::from(id) * 7919 + self.incarnations[id as usize] * 31;
        let mut c = Config::new(id, (0..self.n as NodeId).collect(), self.geo, seed);
        c.durability = Durability::Volatile;
        c.window = 8;
        c.batch_bytes = 512;
        c.max_queue = 64;
        c.heartbeat_timeout = 10;
        c.election_timeout = 12;
        c.max_outstanding = 16;
        c.message_bytes = 1024;
        c
    }

    fn fresh_node(&self, id: NodeId, recovering: bool) -> Node {
        let info = RegionInfo {
            cluster: 7,
            node: id,
            ring: self.geo,
        };
        Node {
            core: Core::new(self.cfg(id), recovering).unwrap(),
            region: Arc::new(Region::anonymous(info).unwrap()),
            reader: RingReader::new(self.geo),
            writer: None,
            applied: BTreeMap::new(),
            seen_commit: None,
            seen_progress: vec![None; 16],
            staged: BTreeMap::new(),
            ckpt: None,
        }
    }

    fn new(n: usize) -> Cluster {
        let mut c = Cluster {
            n,
            geo: RingGeometry::new(64, 64).unwrap(),
            nodes: Vec::new(),
            up: vec![true; n],
            incarnations: vec![0; n],
            msgs: Vec::new(),
            ops: BTreeMap::new(),
            done: BTreeMap::new(),
            cut: BTreeSet::new(),
            history: Vec::new(),
            ticket: 1,
            log: std::env::var_os("REPRO_LOG").is_some(),
        };
        for id in 0..n as NodeId {
            let node = c.fresh_node(id, false);
            c.nodes.push(node);
        }
        c
    }

    fn exec(&mut self, i: usize) {
        let me = i as NodeId;
        while let Some(a) = self.nodes[i].core.poll_action() {
            match a {
                Action::Write {
                    peer,
                    offset,
                    data,
                    token,
                } => self
                    .ops
                    .entry((me, peer))
                    .or_default()
                    .push_back(Op::Write {
                        offset,
                        data: data.as_slice().to_vec(),
                        token: token.get(),
                    }),
                Action::Read {
                    peer,
                    offset,
                    len,
                    token,
                } => self.ops.entry((me, peer)).or_default().push_back(Op::Read {
                    offset,
                    len,
                    token: token.get(),
                }),
                Action::Send { to, msg } => {
                    if self.log {
                        eprintln!("  send {me}->{to}: {}", short(&msg));
                    }
                    self.msgs.push((me, to, msg.encode()))
                }
                Action::SetWriter(w) => self.nodes[i].writer = w,
                Action::FenceAndDrain => {
                    self.nodes[i].writer = None;
                    self.drain(i);
                    self.nodes[i].core.handle_fenced();
                }
                Action::ResetRing { ballot, expect } => self.nodes[i].reader.reset(ballot, expect),
                Action::PersistPromise(_) => {}
                Action::Persist { from, to, seq } => {
                    let from = from.max(self.nodes[i].core.log().base() + 1);
                    if from <= to {
                        self.nodes[i].core.handle_persisted(seq, to);
                    }
                }
                Action::Apply { index, entry } => {
                    let p = payload(&entry);
                    if self.log {
                        eprintln!("  node {me} applies {index}: {} bytes", p.len());
                    }
                    self.nodes[i].applied.insert(index, p.clone());
                    self.history.push((me, index, p));
                }
                Action::Heartbeat(v) => {
                    self.nodes[i].region.store_word(layout::HEARTBEAT_OFFSET, v)
                }
                Action::ServeCheckpoint { to, index, offset } => {
                    if self.log {
                        eprintln!("  node {me} asked to serve checkpoint {index}@{offset} to {to}");
                    }
                    // The driver serves its newest checkpoint (one chunk here).
                    let msg = match self.nodes[i].ckpt.clone() {
                        Some((idx, img)) => {
                            self.nodes[to as usize].staged = img;
                            Msg::CkptChunk {
                                index: idx,
                                offset: 0,
                                total: 1,
                                data: vec![0],
                            }
                        }
                        None => Msg::CkptChunk {
                            index: 0,
                            offset: 0,
                            total: 0,
                            data: vec![],
                        },
                    };
                    self.msgs.push((me, to, msg.encode()));
                }
                Action::StageCheckpoint { .. } => {}
                Action::InstallCheckpoint { index, .. } => {
                    // The state machine is restored from the image: it now holds what the
                    // source had applied up to `index`.
                    let img = std::mem::take(&mut self.nodes[i].staged);
                    // The installed image is kept as this replica's newest checkpoint.
                    self.nodes[i].ckpt = Some((
                        index,
                        img.range(..=index).map(|(k, v)| (*k, v.clone())).collect(),
                    ));
                    for (k, v) in img.range(..=index) {
                        self.nodes[i].applied.insert(*k, v.clone());
                        self.history.push((me, *k, v.clone()));
                    }
                    if self.log {
                        eprintln!("  node {me} installs checkpoint {index}");
                    }
                    self.nodes[i].core.handle_checkpoint_installed(index, true);
                }
                Action::CompactLog { .. }
                | Action::Reject { .. }
                | Action::LeadershipLost
                | Action::Rejoined
                | Action::BeginRejoin => {}
                Action::BecameLeader(b) => {
                    if self.log {
                        eprintln!("  node {me} leads with ballot {b}");
                    }
                }
            }
        }
    }

    fn drain(&mut self, i: usize) {
        loop {
            let node = &mut self.nodes[i];
            let Some((h, bytes, consumed)) = node.reader.poll(&node.region) else {
                return;
            };
            node.core.handle_landed(&h, bytes, consumed);
        }
    }

    fn poll_cells(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut buf = [0u8; layout::PROGRESS_ENCODED];
        node.region
            .read(
                layout::COMMIT_CELL_OFFSET,
                &mut buf[..layout::COMMIT_CELL_SIZE],
            )
            .unwrap();
        if let Ok(Some(c)) = CommitCell::decode(&buf) {
            if node.seen_commit != Some(c) {
                node.seen_commit = Some(c);
                node.core.handle_commit_cell(c);
            } else if node.core.commit() < c.commit && node.core.received() > node.core.commit() {
                node.core.handle_commit_cell(c);
            }
        }
        if node.core.is_leader() {
            for m in 0..self.n as NodeId {
                if m as usize == i {
                    continue;
                }
                node.region
                    .read(layout::progress_offset(m), &mut buf)
                    .unwrap();
                if let Ok(Some(cell)) = ProgressCell::decode(&buf) {
                    if node.seen_progress[m as usize] != Some(cell) {
                        node.seen_progress[m as usize] = Some(cell);
                        node.core.handle_progress(m, cell);
                    }
                }
            }
        }
    }

    /// One driver turn after an event: drain the ring, poll cells, flush, execute.
    fn step(&mut self, i: usize) {
        if !self.up[i] {
            return;
        }
        self.drain(i);
        self.poll_cells(i);
        self.nodes[i].core.flush();
        self.exec(i);
    }

    fn tick(&mut self, i: usize) {
        if !self.up[i] {
            return;
        }
        self.drain(i);
        self.poll_cells(i);
        self.nodes[i].core.tick();
        self.step(i);
    }

    fn propose(&mut self, i: usize, cmd: &[u8]) {
        let t = self.ticket;
        self.ticket += 1;
        self.nodes[i].core.propose(t, cmd).expect("leader accepts");
        self.step(i);
    }

    /// Delivers the first in-flight message from `from` to `to` that `pred` selects.
    fn deliver(&mut self, from: NodeId, to: NodeId, pred: impl Fn(&Msg) -> bool) -> bool {
        let Some(k) = self
            .msgs
            .iter()
            .position(|(f, t, b)| *f == from && *t == to && pred(&Msg::decode(b).unwrap()))
        else {
            return false;
        };
        let (_, _, b) = self.msgs.remove(k);
        if !self.up[to as usize] || self.cut.contains(&(from, to)) {
            return true;
        }
        let m = Msg::decode(&b).unwrap();
        if self.log {
            eprintln!("deliver {from}->{to}: {}", short(&m));
        }
        // As `Replica::step`: the ring is drained before the polled events are handled.
        self.drain(to as usize);
        self.nodes[to as usize].core.handle_message(from, m);
        self.step(to as usize);
        true
    }

    /// Lands (or fails) the oldest posted one-sided operation from `from` at `to`.
    fn land(&mut self, from: NodeId, to: NodeId) -> bool {
        let Some(op) = self.ops.get_mut(&(from, to)).and_then(|q| q.pop_front()) else {
            return false;
        };
        let reach = self.up[to as usize] && !self.cut.contains(&(from, to));
        let mut landed = false;
        let node = &self.nodes[to as usize];
        let c = match op {
            Op::Write {
                offset,
                data,
                token,
            } => {
                let result = if !reach {
                    Err(FabricError::Disconnected(to))
                } else {
                    match classify_remote_write(from, offset, data.len(), node.region.len()) {
                        Err(_) => Err(FabricError::OutOfBounds(to)),
                        Ok(WriteTarget::Ring) if node.writer != Some(from) => {
                            Err(FabricError::PermissionDenied(to))
                        }
                        Ok(_) => {
                            node.region.write(offset, &data).unwrap();
                            landed = true;
                            Ok(())
                        }
                    }
                };
                Completion::Write {
                    peer: to,
                    token,
                    result,
                }
            }
            Op::Read { offset, len, token } => {
                let result = if !reach {
                    Err(FabricError::Disconnected(to))
                } else {
                    let mut buf = vec![0u8; len];
                    node.region.read(offset, &mut buf).unwrap();
                    Ok(buf)
                };
                Completion::Read {
                    peer: to,
                    token,
                    result,
                }
            }
        };
        self.done.entry((from, to)).or_default().push_back(c);
        if landed {
            // The owner busy-polls its ring and cells.
            self.step(to as usize);
        }
        true
    }

    /// The driver saved a checkpoint at `applied` (and, if `compact`, truncated behind it).
    fn take_checkpoint(&mut self, i: usize, compact: bool) -> Index {
        let idx = self.nodes[i].core.applied();
        let img = self.nodes[i]
            .applied
            .range(..=idx)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        self.nodes[i].ckpt = Some((idx, img));
        if compact {
            self.nodes[i].core.compact(idx);
        }
        idx
    }

    fn land_all(&mut self, from: NodeId, to: NodeId) {
        while self.land(from, to) {}
    }

    /// Returns the oldest completion of `issuer`'s operations at `peer` to `issuer`.
    fn complete(&mut self, issuer: NodeId, peer: NodeId) -> bool {
        let Some(c) = self
            .done
            .get_mut(&(issuer, peer))
            .and_then(|q| q.pop_front())
        else {
            return false;
        };
        if self.up[issuer as usize] {
            self.drain(issuer as usize);
            self.nodes[issuer as usize].core.handle_completion(c);
            self.step(issuer as usize);
        }
        true
    }

    fn complete_all(&mut self, issuer: NodeId, peer: NodeId) {
        while self.complete(issuer, peer) {}
    }

    /// Everything in flight among `set` happens, until nothing is left.
    fn settle(&mut self, set: &[NodeId]) {
        for _ in 0..10_000 {
            let mut any = false;
            let pairs: Vec<(NodeId, NodeId)> = set
                .iter()
                .flat_map(|&a| set.iter().map(move |&b| (a, b)))
                .filter(|(a, b)| a != b)
                .collect();
            for &(a, b) in &pairs {
                while self.deliver(a, b, |_| true) {
                    any = true;
                }
                while self.land(a, b) {
                    any = true;
                }
                while self.complete(a, b) {
                    any = true;
                }
            }
            if !any {
                return;
            }
        }
        panic!("settle did not converge");
    }

    /// Volatile crash: the node forgets everything; `restart` boots it recovering.
    fn crash(&mut self, i: usize, restart: bool) {
        let id = i as NodeId;
        self.up[i] = false;
        self.msgs.retain(|(_, t, _)| *t != id);
        self.done.retain(|(issuer, _), _| *issuer != id);
        // Posted operations towards it fail when they land; nothing is pending at it.
        if restart {
            self.incarnations[i] += 1;
            self.nodes[i] = self.fresh_node(id, true);
            self.up[i] = true;
            self.exec(i);
        }
    }

    fn agreement(&self) -> Vec<String> {
        let mut by: BTreeMap<Index, (NodeId, Vec<u8>)> = BTreeMap::new();
        let mut bad = Vec::new();
        for (n, i, p) in &self.history {
            match by.get(i) {
                Some((m, q)) if q != p => bad.push(format!(
                    "index {i}: node {n} applied {} bytes {:?}.., node {m} applied {} bytes {:?}..",
                    p.len(),
                    &p[..p.len().min(24)],
                    q.len(),
                    &q[..q.len().min(24)]
                )),
                Some(_) => {}
                None => {
                    by.insert(*i, (*n, p.clone()));
                }
            }
        }
        bad
    }

    /// `i` loses its data dir and is started again as if the cluster were new (the
    /// operator forgot `--rejoin`): a blank replica, with no memory of its promises.
    fn boot_blank(&mut self, i: usize) {
        self.crash(i, false);
        self.incarnations[i] += 1;
        self.nodes[i] = self.fresh_node(i as NodeId, false);
        self.up[i] = true;
        self.exec(i);
    }

    /// Heals every cut, lets `live` run for a while, and checks agreement.
    fn heal_and_converge(&mut self, live: &[usize]) {
        self.cut.clear();
        let ids: Vec<NodeId> = live.iter().map(|&i| i as NodeId).collect();
        for _ in 0..400 {
            for &i in live {
                self.tick(i);
            }
            self.settle(&ids);
        }
        eprintln!("end:");
        self.describe();
        let bad = self.agreement();
        for b in &bad {
            eprintln!("AGREEMENT VIOLATED: {b}");
        }
        assert!(bad.is_empty(), "agreement violated");
        assert!(
            live.iter().any(|&i| self.nodes[i].core.is_leader()),
            "a leader among the live replicas once healed"
        );
    }

    /// The value applied at `index` by anyone is applied there by every replica in `live`
    /// once a new command commits after it.
    fn check_chosen_survives(&mut self, index: Index, live: &[usize]) {
        let leader = *live
            .iter()
            .find(|&&i| self.nodes[i].core.is_leader())
            .expect("a leader");
        self.propose(leader, b"after-healing");
        let ids: Vec<NodeId> = live.iter().map(|&i| i as NodeId).collect();
        for _ in 0..50 {
            for &i in live {
                self.tick(i);
            }
            self.settle(&ids);
        }
        let chosen = self
            .history
            .iter()
            .find(|(_, i, _)| *i == index)
            .map(|h| h.2.clone())
            .expect("someone applied the index");
        for &i in live {
            assert_eq!(
                self.nodes[i].applied.get(&index),
                Some(&chosen),
                "node {i} applied the chosen value at {index}"
            );
        }
    }

    fn describe(&self) {
        for (k, n) in self.nodes.iter().enumerate() {
            eprintln!(
                "  node {k} up={} role={} promised={} commit={} applied={} log={}..={} {}",
                self.up[k],
                n.core.role_name(),
                n.core.promised(),
                n.core.commit(),
                n.core.applied(),
                n.core.log().base() + 1,
                n.core.log().last(),
                n.core.peer_summary()
            );
        }
    }
}

fn short(m: &Msg) -> String {
    match m {
        Msg::Promise(p) => format!(
            "Promise(b={} from={} recv={} commit={} base={} chunk {}/{} entries={})",
            p.ballot,
            p.from,
            p.received,
            p.commit,
            p.base,
            p.chunk,
            p.chunks,
            p.entries.len()
        ),
        Msg::RecoverResp(r) => format!(
            "RecoverResp(promised={} commit={} base={} from={} last={} entries={})",
            r.promised,
            r.commit,
            r.base,
            r.from,
            r.last,
            r.entries.len()
        ),
        Msg::CkptChunk {
            index,
            offset,
            total,
            ..
        } => format!("CkptChunk({index}@{offset}/{total})"),
        other => format!("{other:?}"),
    }
}

fn cmd(k: u64) -> Vec<u8> {
    let mut v = b"cmd-".to_vec();
    v.extend_from_slice(&k.to_le_bytes());
    v
}

fn elect_first(c: &mut Cluster) {
    let all: Vec<NodeId> = (0..c.n as NodeId).collect();
    for _ in 0..10 {
        c.tick(0);
    }
    c.settle(&all);
    assert!(c.nodes[0].core.is_leader(), "node 0 leads");
    // A promise that arrived after node 0 won is taken up when node 0 asks again.
    for _ in 0..100 {
        if c.nodes[0].core.peer_summary().matches("Streaming").count() == c.n - 1 {
            return;
        }
        for i in 0..c.n {
            c.tick(i);
        }
        c.settle(&all);
    }
    panic!(
        "node 0 streams to every replica: {}",
        c.nodes[0].core.peer_summary()
    );
}

/// Three replicas, node 0 elected and three commands chosen by all.
fn three_warm() -> (Cluster, Vec<NodeId>) {
    let mut c = Cluster::new(3);
    let all: Vec<NodeId> = (0..3).collect();
    elect_first(&mut c);
    for k in 0..3 {
        c.propose(0, &cmd(k));
        c.settle(&all);
    }
    (c, all)
}

/// Five replicas, volatile. The rebuild of an amnesiac replica X waits for the leader that
/// the highest answered promise names; here that is a candidate Z that never won, so X does
/// not wait for the real leader L, which still counts X's acknowledgement from before the
/// crash. L chooses e with {L, X (forgotten), Y}; after L dies, Z wins with {Z, X, W}, none
/// of which holds e, and chooses another value at e's index.
#[test]
fn five_replicas_rebuild_misses_a_leader_that_counts_the_old_acknowledgement() {
    let mut c = Cluster::new(5);
    let all: Vec<NodeId> = (0..5).collect();
    let (l, x, y, z, w) = (0usize, 1usize, 2usize, 3usize, 4usize);
    elect_first(&mut c);
    for k in 0..4 {
        c.propose(l, &cmd(k));
        c.settle(&all);
    }
    eprintln!("after warm-up:");
    c.describe();
    let k = c.nodes[l].core.commit();
    assert!(k >= 4);

    // L and Z lose each other (a cut link). Z hears no heartbeat and stands; Y, W, X see a
    // live leader and refuse; Z keeps its own promise (a higher ballot than L's).
    c.cut.insert((l as NodeId, z as NodeId));
    c.cut.insert((z as NodeId, l as NodeId));
    for _ in 0..40 {
        if c.nodes[z].core.role_name() == "candidate" {
            break;
        }
        c.tick(z);
    }
    assert_eq!(c.nodes[z].core.role_name(), "candidate");
    c.settle(&[x as NodeId, y as NodeId, z as NodeId, w as NodeId]);
    c.settle(&all); // L's writes to Z fail (cut): Z is resyncing at L
    eprintln!("after Z stood:");
    c.describe();
    let bz = c.nodes[z].core.promised();
    assert!(bz > c.nodes[l].core.promised());

    // L proposes e; it lands at X only (the writes to Y and W are slow).
    c.propose(l, b"THE-CHOSEN-VALUE-e");
    let e_idx = c.nodes[l].core.log().last();
    c.land_all(l as NodeId, x as NodeId);
    c.complete_all(l as NodeId, x as NodeId);
    assert!(c.nodes[l].core.commit() < e_idx, "not chosen yet");

    // X crashes and restarts with amnesia. Its rebuild request to L is slow; Y, Z and W
    // answer. The highest promise among them is Z's: X waits for Z only.
    c.crash(x, true);
    let xs = x as NodeId;
    for _ in 0..100 {
        let mut any = false;
        for o in [y, z, w] {
            while c.deliver(xs, o as NodeId, |m| matches!(m, Msg::RecoverReq { .. })) {
                any = true;
            }
            while c.deliver(o as NodeId, xs, |m| matches!(m, Msg::RecoverResp(_))) {
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    eprintln!("after X's rebuild:");
    c.describe();
    // Z is a candidate (no normal status): it does not answer, so Y and W are no majority
    // of the others, and X waits for the leader they name, L.
    assert!(
        c.nodes[x].core.is_recovering(),
        "X waits for L, which counts its old ack"
    );

    // Now e lands at Y: L counts L, X (its earlier incarnation), Y: a majority of 5.
    c.land_all(l as NodeId, y as NodeId);
    c.complete_all(l as NodeId, y as NodeId);
    eprintln!("after e landed at Y:");
    c.describe();
    assert!(c.nodes[l].core.commit() >= e_idx, "L chose e");
    assert!(c.nodes[l].applied.contains_key(&e_idx), "L applied e");

    // L dies (its slow write of e to W never arrives); Y is cut off. W notices the silence.
    c.crash(l, false);
    c.ops.retain(|(from, _), _| *from != l as NodeId);
    for o in 0..5 {
        if o != y {
            c.cut.insert((y as NodeId, o as NodeId));
            c.cut.insert((o as NodeId, y as NodeId));
        }
    }
    for _ in 0..12 {
        c.tick(w);
    }
    // Z stands again and wins with Z, X, W.
    for _ in 0..200 {
        if c.nodes[z].core.is_leader() {
            break;
        }
        c.tick(z);
        c.settle(&[x as NodeId, z as NodeId, w as NodeId]);
    }
    eprintln!("after Z's second candidacy:");
    c.describe();
    // With L dead, Y cut off and X unable to rebuild, Z cannot win: {Z, W} is no majority.
    if c.nodes[z].core.is_leader() {
        c.propose(z, b"another-value-f");
        c.settle(&[x as NodeId, z as NodeId, w as NodeId]);
    }
    c.heal_and_converge(&[x, y, z, w]);
    c.check_chosen_survives(e_idx, &[x, y, z, w]);
}

/// Three replicas, volatile. A follower that is streaming from the leader receives a late
/// duplicate of an earlier NeedCheckpoint, pulls the leader's newest checkpoint and installs
/// it: the install restarts its ring stream (reader back to slot 0) without a fence. A write
/// of the leader's old stream lands after that: the leader counts it as accepted, but the
/// follower never reads it.
#[test]
fn install_while_streaming_counts_a_write_the_follower_never_reads() {
    let (mut c, all) = three_warm();
    let (l, f, b) = (0usize, 1usize, 2usize);
    let (ln, fnn, bn) = (l as NodeId, f as NodeId, b as NodeId);
    // F is cut off for a while; L and B go on; L checkpoints and compacts.
    c.cut.insert((ln, fnn));
    c.cut.insert((fnn, ln));
    for k in 10..16 {
        c.propose(l, &cmd(k));
        c.settle(&all);
    }
    let ck1 = c.take_checkpoint(l, true);
    c.cut.clear();
    // L asks F to resync; F's new stream starts below L's base: NeedsCheckpoint.
    for _ in 0..6 {
        c.tick(l);
        if c.msgs
            .iter()
            .any(|(_, _, m)| matches!(Msg::decode(m), Ok(Msg::NeedCheckpoint { .. })))
        {
            break;
        }
        c.settle(&all);
    }
    let need = c
        .msgs
        .iter()
        .find(|(fr, to, m)| {
            *fr == ln && *to == fnn && matches!(Msg::decode(m), Ok(Msg::NeedCheckpoint { .. }))
        })
        .cloned()
        .expect("L sent NeedCheckpoint");
    // The network duplicates it (one copy is delayed).
    let dup = need.clone();
    assert!(c.deliver(ln, fnn, |m| matches!(m, Msg::NeedCheckpoint { .. })));
    // L's driver serves its newest checkpoint (ck1) in one chunk.
    assert!(c.deliver(fnn, ln, |m| matches!(m, Msg::CkptReq { .. })));
    c.settle(&all);
    for _ in 0..3 {
        c.tick(l);
        c.settle(&all);
    }
    eprintln!("after F's first catch-up:");
    c.describe();
    assert!(c.nodes[f].core.applied() >= ck1);

    // L commits e1 (landed at F and B); F has not yet learned that commit.
    c.propose(l, b"e1");
    let e1 = c.nodes[l].core.log().last();
    // Land only the entry write at F and B (not the commit cell that would follow).
    c.land(ln, fnn);
    c.land(ln, bn);
    c.complete(ln, fnn);
    c.complete(ln, bn);
    assert!(c.nodes[l].core.commit() >= e1);
    let ck2 = c.take_checkpoint(l, false);
    assert!(
        ck2 > c.nodes[f].core.applied(),
        "F is behind L's newest checkpoint"
    );
    eprintln!("L applied {ck2}; F applied {}", c.nodes[f].core.applied());

    // The delayed duplicate arrives: F (a streaming follower) pulls L's newest checkpoint.
    c.msgs.push(dup);
    assert!(c.deliver(ln, fnn, |m| matches!(m, Msg::NeedCheckpoint { .. })));
    assert!(
        !c.nodes[f].core.is_pulling(),
        "a NeedCheckpoint of an earlier stream does not restart a streaming follower"
    );
    let _ = c.deliver(fnn, ln, |m| matches!(m, Msg::CkptReq { .. }));
    // Meanwhile L proposes e2 and posts its writes.
    c.propose(l, b"THE-CHOSEN-VALUE-e2");
    let e2 = c.nodes[l].core.log().last();
    // F receives the newest checkpoint (ck2) and installs it: new stream, no fence.
    let _ = c.deliver(
        ln,
        fnn,
        |m| matches!(m, Msg::CkptChunk { index, .. } if *index == ck2),
    );
    eprintln!("after F's second install:");
    c.describe();
    // L's pending writes to F (the old stream) land now; they complete at L.
    c.land_all(ln, fnn);
    c.complete_all(ln, fnn);
    c.step(f);
    eprintln!("after L's old-stream writes landed at F:");
    c.describe();
    let f_has_e2 = c.nodes[f].core.log().get(e2).is_some();
    eprintln!(
        "L commit {} (e2 = {e2}); F holds e2 in its log: {f_has_e2}",
        c.nodes[l].core.commit()
    );
    let b_has_e2 = c.nodes[b].core.log().get(e2).is_some();
    assert!(
        c.nodes[l].core.commit() < e2 || f_has_e2 || b_has_e2,
        "L chose e2 that no follower holds"
    );

    // L dies before its write of e2 reaches B; F and B elect F.
    c.crash(l, false);
    c.ops.retain(|(from, _), _| *from != ln);
    c.msgs.retain(|(_, to, _)| *to != ln);
    for _ in 0..10 {
        c.tick(b);
    }
    for _ in 0..200 {
        if c.nodes[f].core.is_leader() || c.nodes[b].core.is_leader() {
            break;
        }
        c.tick(f);
        c.settle(&[fnn, bn]);
    }
    let nl = if c.nodes[f].core.is_leader() { f } else { b };
    assert!(c.nodes[nl].core.is_leader());
    c.propose(nl, b"another-value-f");
    c.settle(&[fnn, bn]);
    for _ in 0..10 {
        c.tick(nl);
        c.settle(&[fnn, bn]);
    }
    c.heal_and_converge(&[f, b]);
    if c.nodes[l].applied.contains_key(&e2) {
        c.check_chosen_survives(e2, &[f, b]);
    }
    let bad = c.agreement();
    assert!(
        bad.is_empty(),
        "agreement violated at e2's index {e2}: {bad:?}"
    );
}

/// Three replicas, volatile. An amnesiac replica X is answered by A (which compacted the
/// log up to 8 after choosing 4..=8) and by O (an old leader that was cut off and holds an
/// unchosen tail 4..=8 of a lower ballot, and whose newest checkpoint is 3). X pulls A's
/// checkpoint, A stops answering, the pull moves to O and installs checkpoint 3; O's entries
/// continue it without a gap, so the rebuild takes O's unchosen 4..=8 as the highest-ballot
/// values (A, the only other holder, compacted them) and applies them up to commit 8.
#[test]
fn rebuild_on_an_older_checkpoint_adopts_unchosen_entries() {
    let mut c = Cluster::new(3);
    let all: Vec<NodeId> = (0..3).collect();
    let (o, a, x) = (0usize, 1usize, 2usize);
    let (on, an, xn) = (o as NodeId, a as NodeId, x as NodeId);
    elect_first(&mut c);
    for k in 0..3 {
        c.propose(o, &cmd(k));
        c.settle(&all);
    }
    for _ in 0..3 {
        c.tick(o);
        c.settle(&all);
    }
    let c_o = c.take_checkpoint(o, true);
    eprintln!("O checkpointed at {c_o}");
    // O is cut off; as a stale leader it appends 5 entries nobody else gets.
    for p in [an, xn] {
        c.cut.insert((on, p));
        c.cut.insert((p, on));
    }
    for k in 0..5 {
        c.propose(o, format!("stale-{k}").as_bytes());
        c.settle(&all);
    }
    // A and X stop hearing O; A stands (X no longer sees a live leader) and wins with X.
    for _ in 0..10 {
        c.tick(x);
    }
    for _ in 0..40 {
        if c.nodes[a].core.is_leader() {
            break;
        }
        c.tick(a);
        c.settle(&[an, xn]);
    }
    assert!(c.nodes[a].core.is_leader(), "A leads");
    for k in 0..5 {
        c.propose(a, format!("chosen-{k}").as_bytes());
        c.settle(&[an, xn]);
    }
    for _ in 0..3 {
        c.tick(a);
        c.settle(&[an, xn]);
    }
    let c_a = c.take_checkpoint(a, true);
    eprintln!("after A chose and compacted at {c_a}:");
    c.describe();
    assert!(c_a > c_o);

    // X crashes and rebuilds. O is reachable again (it is still cut from A).
    c.crash(x, true);
    c.cut.remove(&(on, xn));
    c.cut.remove(&(xn, on));
    for _ in 0..100 {
        let mut any = false;
        for p in [on, an] {
            while c.deliver(xn, p, |m| matches!(m, Msg::RecoverReq { .. })) {
                any = true;
            }
            while c.deliver(p, xn, |m| matches!(m, Msg::RecoverResp(_))) {
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    assert!(
        c.nodes[x].core.is_pulling(),
        "X pulls the most compacted answer's checkpoint"
    );
    // A stops answering X (a cut link): the pull moves on, to O.
    c.cut.insert((an, xn));
    c.cut.insert((xn, an));
    for _ in 0..60 {
        if !c.nodes[x].core.is_recovering() {
            break;
        }
        c.tick(x);
        c.settle(&[on, xn]);
    }
    eprintln!("end:");
    c.describe();
    let bad = c.agreement();
    for b in &bad {
        eprintln!("AGREEMENT VIOLATED: {b}");
    }
    assert!(bad.is_empty(), "agreement violated");
}

/// Three replicas, volatile. Same mechanism as the install case, triggered by a duplicated
/// `Resync`: the follower restarts its ring stream (no fence) while the leader, which has
/// already restarted the peer, is streaming to it. A write of the abandoned stream lands and
/// completes; the leader counts it; the follower never reads it.
#[test]
fn duplicated_resync_counts_a_write_the_follower_never_reads() {
    let (mut c, all) = three_warm();
    let (l, f, b) = (0usize, 1usize, 2usize);
    let (ln, fnn, bn) = (l as NodeId, f as NodeId, b as NodeId);
    // A failed write to F (a short cut) puts F in resync at L.
    c.cut.insert((ln, fnn));
    c.cut.insert((fnn, ln));
    c.propose(l, b"e0");
    c.settle(&all);
    c.cut.clear();
    // L asks F to resync; the network duplicates the request.
    for _ in 0..4 {
        c.tick(l);
        if c.msgs.iter().any(|(fr, to, m)| {
            *fr == ln && *to == fnn && matches!(Msg::decode(m), Ok(Msg::Resync { .. }))
        }) {
            break;
        }
        c.settle(&all);
    }
    let dup = c
        .msgs
        .iter()
        .find(|(fr, to, m)| {
            *fr == ln && *to == fnn && matches!(Msg::decode(m), Ok(Msg::Resync { .. }))
        })
        .cloned()
        .expect("L sent Resync");
    c.settle(&all);
    for _ in 0..3 {
        c.tick(l);
        c.settle(&all);
    }
    eprintln!("after the resync:");
    c.describe();
    // L proposes e; the delayed duplicate Resync reaches F first.
    c.propose(l, b"THE-CHOSEN-VALUE-e");
    let e = c.nodes[l].core.log().last();
    c.msgs.push(dup);
    assert!(c.deliver(ln, fnn, |m| matches!(m, Msg::Resync { .. })));
    // L's write of e (old stream) lands at F and completes at L.
    c.land_all(ln, fnn);
    c.complete_all(ln, fnn);
    eprintln!("after e landed at F on the abandoned stream:");
    c.describe();
    let f_has_e = c.nodes[f].core.log().get(e).is_some();
    eprintln!(
        "L commit {} (e = {e}); F holds e: {f_has_e}",
        c.nodes[l].core.commit()
    );
    assert!(
        c.nodes[l].core.commit() < e || f_has_e,
        "L counted a write of an abandoned stream as accepted"
    );
    // L dies before e reaches B; F and B elect a leader and choose another value at e.
    c.crash(l, false);
    c.ops.retain(|(from, _), _| *from != ln);
    c.msgs.retain(|(_, to, _)| *to != ln);
    for _ in 0..10 {
        c.tick(b);
    }
    for _ in 0..200 {
        if c.nodes[f].core.is_leader() || c.nodes[b].core.is_leader() {
            break;
        }
        c.tick(f);
        c.settle(&[fnn, bn]);
    }
    let nl = if c.nodes[f].core.is_leader() { f } else { b };
    assert!(c.nodes[nl].core.is_leader());
    c.propose(nl, b"another-value-f");
    c.settle(&[fnn, bn]);
    for _ in 0..10 {
        c.tick(nl);
        c.settle(&[fnn, bn]);
    }
    c.heal_and_converge(&[f, b]);
    if c.nodes[l].applied.contains_key(&e) {
        c.check_chosen_survives(e, &[f, b]);
    }
    let bad = c.agreement();
    assert!(
        bad.is_empty(),
        "agreement violated at e's index {e}: {bad:?}"
    );
}

/// Three replicas (found by `ballot-sim --seed 258 --replicas 3 --durability durable`). B and
/// L choose e while F, established in L's stream from the start, lags. B loses its data dir
/// and boots blank. F, which never exchanged a vote with B, had no record of B's memory and
/// counted B's blank vote: F won with {F, B}, neither of which holds e, and chose another
/// value at e's index. A replica that learned that values were chosen knows a majority it
/// may not have seen accepted them: it refuses the blank vote of a peer it has no record
/// of, and B rebuilds first.
#[test]
fn blank_vote_of_a_peer_never_heard_from_counts_after_a_leader() {
    let (mut c, all) = three_warm();
    let (l, f, b) = (0usize, 1usize, 2usize);
    let (ln, fnn, bn) = (l as NodeId, f as NodeId, b as NodeId);
    assert!(
        c.nodes[f].core.commit() >= 3,
        "F is established in L's stream"
    );

    // L proposes e; it lands at B only (the data path to F is slow): L chooses e.
    c.propose(l, b"THE-CHOSEN-VALUE-e");
    let e = c.nodes[l].core.log().last();
    c.land_all(ln, bn);
    c.complete_all(ln, bn);
    assert!(c.nodes[l].core.commit() >= e, "L chose e");
    assert!(c.nodes[l].applied.contains_key(&e), "L applied e");

    // B loses its data dir and boots blank; L is cut off from both (it keeps e).
    c.boot_blank(b);
    for o in [f, b] {
        c.cut.insert((ln, o as NodeId));
        c.cut.insert((o as NodeId, ln));
    }
    c.ops.retain(|(from, _), _| *from != ln);
    c.msgs.retain(|(from, to, _)| *from != ln && *to != ln);
    for _ in 0..200 {
        if c.nodes[f].core.is_leader() || c.nodes[b].core.is_leader() {
            break;
        }
        c.tick(f);
        c.tick(b);
        c.settle(&[fnn, bn]);
    }
    eprintln!("after F and B stood:");
    c.describe();
    // F refuses B's blank vote (B rebuilds, and needs L or F's answer as a majority of the
    // others), and B refuses F's: neither wins without L.
    assert!(
        !c.nodes[f].core.is_leader() && !c.nodes[b].core.is_leader(),
        "a leader elected with a blank vote"
    );
    c.heal_and_converge(&all.iter().map(|&n| n as usize).collect::<Vec<_>>());
    c.check_chosen_survives(e, &[l, f, b]);
}
