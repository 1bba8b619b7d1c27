//! `MemFabric`: the fabric inside one process.
//!
//! Two modes. *Instant*: a write lands when posted and completes at once (threads in one
//! process, benchmarks). *Simulated*: every operation is queued with a latency drawn from a
//! seeded generator and happens when the simulator calls [`MemNet::deliver_until`], with
//! fault injection: crashed nodes, partitions, loss/duplication/reordering of control
//! messages, delayed and failed writes. Writes between a pair stay in order, as on an RC
//! queue pair; control messages may be reordered.

use crate::fabric::{Completion, Fabric, FabricError, FabricEvent, MAX_CONTROL};
use crate::layout::{classify_remote_write, WriteTarget};
use crate::region::Region;
use crate::types::NodeId;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex};

/// Fault probabilities (per mille) and latencies (simulated time units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Shortest latency of any operation.
    pub latency_min: u64,
    /// Longest latency of an operation (before the extra delays below).
    pub latency_max: u64,
    /// A control message is dropped.
    pub msg_loss: u32,
    /// A control message is delivered twice (the copy with a latency of its own).
    pub msg_dup: u32,
    /// A control message is held back by four times `latency_max`, so later ones overtake it.
    pub msg_reorder: u32,
    /// A write fails (connection error) without landing.
    pub write_fail: u32,
    /// A write is delayed by up to `slow_extra`.
    pub write_slow: u32,
    /// Largest extra delay of a slow write.
    pub slow_extra: u64,
    /// A control message is replayed once more, up to `late_extra` later (past a rebuild
    /// or a whole leadership).
    pub msg_late: u32,
    /// Largest extra delay of a late replay.
    pub late_extra: u64,
    /// A write lands but its completion reports a failure.
    pub completion_lost: u32,
    /// At each fabric call of a replica (in the middle of its step: between a revoke and
    /// its drain, between a stream reset and the next poll), operations due within
    /// `latency_max` happen at once.
    pub midstep: u32,
}

impl Faults {
    /// No faults, and a short latency (1 to 3 units).
    pub fn none() -> Faults {
        Faults {
            latency_min: 1,
            latency_max: 3,
            msg_loss: 0,
            msg_dup: 0,
            msg_reorder: 0,
            write_fail: 0,
            write_slow: 0,
            slow_extra: 0,
            msg_late: 0,
            late_extra: 0,
            completion_lost: 0,
            midstep: 0,
        }
    }
}

#[derive(Debug)]
enum Op {
    Write {
        from: NodeId,
        to: NodeId,
        offset: usize,
        data: Vec<u8>,
        token: u64,
    },
    Read {
        from: NodeId,
        to: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    },
    Msg {
        from: NodeId,
        to: NodeId,
        bytes: Vec<u8>,
    },
    Done {
        to: NodeId,
        c: Completion,
    },
}

struct Timed(u64, u64, Op);
impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1)) // min-heap
    }
}

struct Node {
    region: Arc<Region>,
    writer: Option<NodeId>,
    inbox: VecDeque<FabricEvent>,
    up: bool,
}

struct Sim {
    now: u64,
    seq: u64,
    rng: u64,
    faults: Faults,
    queue: BinaryHeap<Timed>,
    /// Last delivery time per ordered (from, to) pair, to keep one-sided ops in order.
    fifo: BTreeMap<(NodeId, NodeId), u64>,
    /// Entries that landed in a ring, for the simulator's acceptor checks.
    landed: Vec<Landed>,
}

/// A whole entry that a one-sided write put into `to`'s ring (the simulator checks what
/// the acceptor `to` does with it: never below its promise, and reported by its next one).
#[derive(Debug, Clone)]
pub struct Landed {
    /// The replica whose ring the entry landed in.
    pub to: NodeId,
    /// The writer (a leader).
    pub from: NodeId,
    /// The entry's index.
    pub index: crate::types::Index,
    /// The ballot the entry was written in.
    pub ballot: crate::types::Ballot,
    /// The entry's payload.
    pub payload: Vec<u8>,
}

struct Net {
    nodes: BTreeMap<NodeId, Node>,
    sim: Option<Sim>,
    cut: BTreeSet<(NodeId, NodeId)>,
}

/// The shared in-process network.
#[derive(Clone)]
pub struct MemNet(Arc<Mutex<Net>>);

impl MemNet {
    /// A network where every operation happens when posted (threads, benchmarks, examples).
    pub fn instant() -> MemNet {
        MemNet(Arc::new(Mutex::new(Net {
            nodes: BTreeMap::new(),
            sim: None,
            cut: BTreeSet::new(),
        })))
    }

    /// A network driven by [`MemNet::deliver_until`]: latencies and `faults` drawn from
    /// `seed`, so a run replays exactly.
    pub fn simulated(seed: u64, faults: Faults) -> MemNet {
        let sim = Sim {
            now: 0,
            seq: 0,
            rng: seed | 1,
            faults,
            queue: BinaryHeap::new(),
            fifo: BTreeMap::new(),
            landed: Vec::new(),
        };
        MemNet(Arc::new(Mutex::new(Net {
            nodes: BTreeMap::new(),
            sim: Some(sim),
            cut: BTreeSet::new(),
        })))
    }

    /// Attaches (or re-attaches, after a restart) `node` with its region.
    pub fn attach(&self, node: NodeId, region: Arc<Region>) -> MemFabric {
        let mut n = self.0.lock().unwrap();
        n.nodes.insert(
            node,
            Node {
                region: region.clone(),
                writer: None,
                inbox: VecDeque::new(),
                up: true,
            },
        );
        MemFabric {
            node,
            region,
            net: self.clone(),
        }
    }

    /// The entries that landed in rings since the last call (simulated mode).
    pub fn take_landed(&self) -> Vec<Landed> {
        self.0
            .lock()
            .unwrap()
            .sim
            .as_mut()
            .map(|s| std::mem::take(&mut s.landed))
            .unwrap_or_default()
    }

    /// The node stops: it receives nothing more; operations towards it fail. Attach it
    /// again to restart it.
    pub fn crash(&self, node: NodeId) {
        if let Some(n) = self.0.lock().unwrap().nodes.get_mut(&node) {
            n.up = false;
            n.inbox.clear();
        }
    }

    /// Cuts or restores the link from `from` to `to` only (messages, writes and reads that
    /// `from` sends; `to` still reaches `from`).
    pub fn set_link_one_way(&self, from: NodeId, to: NodeId, up: bool) {
        let mut n = self.0.lock().unwrap();
        if up {
            n.cut.remove(&(from, to));
        } else {
            n.cut.insert((from, to));
        }
    }

    /// Cuts (or restores) both directions between `a` and `b`.
    pub fn set_link(&self, a: NodeId, b: NodeId, up: bool) {
        let mut n = self.0.lock().unwrap();
        for k in [(a, b), (b, a)] {
            if up {
                n.cut.remove(&k);
            } else {
                n.cut.insert(k);
            }
        }
    }

    /// Simulated mode: the link from `from` to `to` stalls for `units` from now
    /// (a congested path): its writes, reads and their completions, posted now or later,
    /// arrive no earlier than that, in order. Control messages are not held up.
    pub fn stall(&self, from: NodeId, to: NodeId, units: u64) {
        if let Some(s) = self.0.lock().unwrap().sim.as_mut() {
            let until = s.now + units;
            for k in [(from, to), (to, from)] {
                let last = s.fifo.entry(k).or_insert(0);
                *last = (*last).max(until);
            }
        }
    }

    /// Restores every link cut by [`MemNet::set_link`] or [`MemNet::set_link_one_way`].
    pub fn heal_all(&self) {
        self.0.lock().unwrap().cut.clear();
    }

    /// Simulated mode: replaces the fault probabilities (for example [`Faults::none`] once the
    /// faulty phase of a run is over).
    pub fn set_faults(&self, f: Faults) {
        if let Some(s) = self.0.lock().unwrap().sim.as_mut() {
            s.faults = f;
        }
    }

    /// Simulated mode: the current time (0 in instant mode).
    pub fn now(&self) -> u64 {
        self.0.lock().unwrap().sim.as_ref().map_or(0, |s| s.now)
    }

    /// Simulated mode: performs every operation due at or before `t`.
    pub fn deliver_until(&self, t: u64) {
        let mut n = self.0.lock().unwrap();
        loop {
            let sim = n.sim.as_mut().expect("simulated network");
            match sim.queue.peek() {
                Some(op) if op.0 <= t => {}
                _ => {
                    sim.now = t;
                    return;
                }
            }
            let Timed(at, _, op) = sim.queue.pop().unwrap();
            sim.now = at;
            n.perform(op);
        }
    }
}

impl Sim {
    fn random(&mut self) -> u64 {
        crate::types::xorshift(&mut self.rng)
    }
    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.random() % 1000 < u64::from(per_mille)
    }
    fn latency(&mut self) -> u64 {
        let f = self.faults;
        f.latency_min + self.random() % (f.latency_max - f.latency_min + 1)
    }
    fn schedule(&mut self, at: u64, op: Op) {
        self.seq += 1;
        self.queue.push(Timed(at, self.seq, op));
    }
    /// Schedules an in-order one-sided operation on the (from, to) pair.
    fn schedule_fifo(&mut self, from: NodeId, to: NodeId, extra: u64, op: Op) {
        let at = self.now + self.latency() + extra;
        let last = self.fifo.entry((from, to)).or_insert(0);
        let at = at.max(*last);
        *last = at;
        self.schedule(at, op);
    }
}

impl Net {
    fn reachable(&self, from: NodeId, to: NodeId) -> bool {
        !self.cut.contains(&(from, to)) && self.nodes.get(&to).is_some_and(|n| n.up)
    }

    fn complete(&mut self, to: NodeId, c: Completion) {
        match self.sim.as_mut() {
            Some(s) => {
                // Completions travel back in order with the pair's other operations.
                let (a, b) = match &c {
                    Completion::Write { peer, .. } | Completion::Read { peer, .. } => (*peer, to),
                };
                s.schedule_fifo(a, b, 0, Op::Done { to, c });
            }
            None => {
                if let Some(n) = self.nodes.get_mut(&to) {
                    n.inbox.push_back(FabricEvent::Completion(c));
                }
            }
        }
    }

    /// A WRITE of `data` from `from` into `to`'s region at `offset`, performed now.
    fn perform_write(&mut self, from: NodeId, to: NodeId, offset: usize, data: &[u8], token: u64) {
        let failed = self.sim.as_mut().is_some_and(|s| {
            let p = s.faults.write_fail;
            s.chance(p)
        });
        let result = if failed || !self.reachable(from, to) {
            Err(FabricError::Disconnected(to))
        } else {
            let n = self.nodes.get_mut(&to).unwrap();
            match classify_remote_write(from, offset, data.len(), n.region.len()) {
                Err(_) => Err(FabricError::OutOfBounds(to)),
                Ok(WriteTarget::Ring) if n.writer != Some(from) => {
                    Err(FabricError::PermissionDenied(to))
                }
                Ok(target) => {
                    n.region.write(offset, data).expect("classified in bounds");
                    if let (Some(s), WriteTarget::Ring) = (self.sim.as_mut(), target) {
                        if let Ok((h, p)) = crate::layout::decode_entry(data) {
                            s.landed.push(Landed {
                                to,
                                from,
                                index: h.index,
                                ballot: h.ballot,
                                payload: p.to_vec(),
                            });
                        }
                    }
                    let lost = self.sim.as_mut().is_some_and(|s| {
                        let p = s.faults.completion_lost;
                        s.chance(p)
                    });
                    if lost {
                        Err(FabricError::Disconnected(to))
                    } else {
                        Ok(())
                    }
                }
            }
        };
        self.complete(
            from,
            Completion::Write {
                peer: to,
                token,
                result,
            },
        );
    }

    fn perform(&mut self, op: Op) {
        match op {
            Op::Write {
                from,
                to,
                offset,
                data,
                token,
            } => self.perform_write(from, to, offset, &data, token),
            Op::Read {
                from,
                to,
                offset,
                len,
                token,
            } => {
                let result = if !self.reachable(from, to) {
                    Err(FabricError::Disconnected(to))
                } else {
                    let mut buf = vec![0u8; len];
                    match self.nodes[&to].region.read(offset, &mut buf) {
                        Ok(()) => Ok(buf),
                        Err(_) => Err(FabricError::OutOfBounds(to)),
                    }
                };
                self.complete(
                    from,
                    Completion::Read {
                        peer: to,
                        token,
                        result,
                    },
                );
            }
            Op::Msg { from, to, bytes } => {
                if self.reachable(from, to) {
                    let n = self.nodes.get_mut(&to).unwrap();
                    n.inbox.push_back(FabricEvent::Message { from, bytes });
                }
            }
            Op::Done { to, c } => {
                if let Some(n) = self.nodes.get_mut(&to).filter(|n| n.up) {
                    n.inbox.push_back(FabricEvent::Completion(c));
                }
            }
        }
    }

    /// Simulated mode, called inside a replica's step: sometimes operations due soon
    /// happen now, so that writes land and messages arrive mid-step.
    fn midstep(&mut self) {
        let chance = self.sim.as_ref().map_or(0, |s| s.faults.midstep);
        self.midstep_at(chance);
    }

    /// [`Net::midstep`] with its own chance (per mille).
    fn midstep_at(&mut self, chance: u32) {
        let Some(s) = self.sim.as_mut() else { return };
        if !s.chance(chance) {
            return;
        }
        let until = s.now + s.faults.latency_max;
        while self
            .sim
            .as_ref()
            .and_then(|s| s.queue.peek())
            .is_some_and(|op| op.0 <= until)
        {
            let Timed(_, _, op) = self.sim.as_mut().unwrap().queue.pop().unwrap();
            self.perform(op);
        }
    }

    fn post(&mut self, op: Op) {
        let Some(s) = self.sim.as_mut() else {
            return self.perform(op);
        };
        match op {
            Op::Msg { from, to, bytes } => {
                if s.chance(s.faults.msg_loss) {
                    return;
                }
                let reorder = if s.chance(s.faults.msg_reorder) {
                    s.faults.latency_max * 4
                } else {
                    0
                };
                let at = s.now + s.latency() + reorder;
                if s.chance(s.faults.msg_late) {
                    let at3 = s.now + s.latency() + s.random() % (s.faults.late_extra + 1);
                    s.schedule(
                        at3,
                        Op::Msg {
                            from,
                            to,
                            bytes: bytes.clone(),
                        },
                    );
                }
                if s.chance(s.faults.msg_dup) {
                    let at2 = s.now + s.latency();
                    s.schedule(
                        at2,
                        Op::Msg {
                            from,
                            to,
                            bytes: bytes.clone(),
                        },
                    );
                }
                s.schedule(at, Op::Msg { from, to, bytes });
            }
            Op::Write { from, to, .. } | Op::Read { from, to, .. } => {
                let extra = if s.chance(s.faults.write_slow) {
                    s.random() % (s.faults.slow_extra + 1)
                } else {
                    0
                };
                s.schedule_fifo(from, to, extra, op);
            }
            Op::Done { .. } => unreachable!("completions are not posted"),
        }
    }
}

/// One node's handle on a [`MemNet`].
pub struct MemFabric {
    node: NodeId,
    region: Arc<Region>,
    net: MemNet,
}

impl MemFabric {
    fn check_peer(&self, n: &Net, peer: NodeId) -> Result<(), FabricError> {
        if peer == self.node || !n.nodes.contains_key(&peer) {
            return Err(FabricError::UnknownPeer(peer));
        }
        Ok(())
    }
}

impl Fabric for MemFabric {
    fn node(&self) -> NodeId {
        self.node
    }
    fn region(&self) -> &Arc<Region> {
        &self.region
    }
    fn write(
        &mut self,
        peer: NodeId,
        offset: usize,
        data: &[u8],
        token: u64,
    ) -> Result<(), FabricError> {
        let mut n = self.net.0.lock().unwrap();
        self.check_peer(&n, peer)?;
        if n.sim.is_none() {
            // Instant: it lands now, straight from the caller's bytes (no copy).
            n.perform_write(self.node, peer, offset, data, token);
            return Ok(());
        }
        n.midstep();
        n.post(Op::Write {
            from: self.node,
            to: peer,
            offset,
            data: data.to_vec(),
            token,
        });
        Ok(())
    }
    fn read(
        &mut self,
        peer: NodeId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), FabricError> {
        let mut n = self.net.0.lock().unwrap();
        self.check_peer(&n, peer)?;
        n.post(Op::Read {
            from: self.node,
            to: peer,
            offset,
            len,
            token,
        });
        Ok(())
    }
    fn send(&mut self, peer: NodeId, msg: &[u8]) -> Result<(), FabricError> {
        if msg.len() > MAX_CONTROL {
            return Err(FabricError::TooLarge {
                len: msg.len(),
                max: MAX_CONTROL,
            });
        }
        let mut n = self.net.0.lock().unwrap();
        self.check_peer(&n, peer)?;
        n.midstep();
        n.post(Op::Msg {
            from: self.node,
            to: peer,
            bytes: msg.to_vec(),
        });
        Ok(())
    }
    fn flush(&mut self) -> Result<(), FabricError> {
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize {
        let mut n = self.net.0.lock().unwrap();
        let Some(me) = n.nodes.get_mut(&self.node) else {
            return 0;
        };
        let k = me.inbox.len();
        out.extend(me.inbox.drain(..));
        k
    }
    fn set_writer(&mut self, writer: Option<NodeId>) -> Result<(), FabricError> {
        let mut n = self.net.0.lock().unwrap();
        // Writes of the old writer may land right up to the revoke: more often here than
        // at other calls, since this is the window that the fence's drain exists for.
        let chance = n
            .sim
            .as_ref()
            .map_or(0, |s| (s.faults.midstep * 4).min(800));
        n.midstep_at(chance);
        if let Some(me) = n.nodes.get_mut(&self.node) {
            me.writer = writer;
        }
        Ok(())
    }
}
