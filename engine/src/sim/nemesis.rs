//! Composed faults ("nemesis episodes"): several faults in a fixed order, at moments the
//! simulator picks by looking at the cluster, with every choice drawn from the seed.
//!
//! The rebuild rules guard windows that open only when faults line up: a replica must lose
//! its memory right after the leader counted its acknowledgement, while the leader's other
//! data paths lag and the leader cannot hear its rebuild request (the first schedule of
//! `engine/tests/schedules.rs`). Independent random faults line these up in few seeds; an
//! episode lines them up and leaves the rest to chance (which follower, which timings, a
//! stuck candidate or not). Nothing in an episode names a rule of the protocol: it is a
//! fault schedule, and the checks that judge the run are the simulator's usual ones.

use super::{Disk, MemCheckpoints, Rng, Sim, UNITS_PER_TICK};
use crate::protocol::Durability;
use crate::types::NodeId;

/// The episodes of one run: their rate, drawn from the seed on a random stream of their
/// own (a seed with episodes off replays as it did before they existed).
pub(super) struct Nemesis {
    pub(super) rng: Rng,
    /// Chance per tick (per million) that an episode starts when none runs.
    rate: u64,
    state: Episode,
    /// No episode starts before this tick (the cluster settles after one).
    calm_until: u64,
}

enum Episode {
    Idle,
    /// The amnesiac acker: the leader's data paths to every follower but `victim` are
    /// stalled; once the leader counts an acknowledgement of `victim` past its commit
    /// (before `deadline`, or the episode ends), `victim` loses its memory, restarts at once and rebuilds cut off
    /// from the leader, which may go on counting that acknowledgement.
    Acker {
        leader: NodeId,
        victim: NodeId,
        deadline: u64,
    },
    /// Before the amnesiac acker, with 5 replicas or more, sometimes: `stuck` is cut from
    /// the leader and stands (by `deadline`, or the episode ends), so that its promise is
    /// the highest the rebuild hears, from no replica in normal status.
    Standing {
        leader: NodeId,
        victim: NodeId,
        stuck: NodeId,
        deadline: u64,
    },
    /// The deposed view: the leader and some followers (a minority, `old` as a bit set)
    /// are cut from the rest, which elects a new leader; once it chose something, a
    /// replica of the new view that holds it loses its memory and rebuilds reaching only
    /// the deposed view.
    Deposed {
        old: u64,
        deadline: u64,
    },
    /// The stale tail: the leader and some followers (`old`) are cut from the rest; the
    /// leader appends what its clients send (a tail nobody else gets), then its view
    /// pauses (a stopped process) while the rest elects, chooses and compacts past that
    /// tail. A replica of the new view then loses its memory and rebuilds from one that
    /// compacted and from the deposed view, which resumes; the compacted one stops
    /// answering once the rebuild pulls its checkpoint.
    Stale {
        old: u64,
        stage: Stale,
        until: u64,
    },
}

#[derive(Clone, Copy)]
enum Stale {
    Appending,
    Paused,
    /// `victim` lost its memory at `at`.
    Rebuilding {
        victim: NodeId,
        source: NodeId,
        at: u64,
    },
}

/// How often each episode is picked: the amnesiac acker, the deposed view, the stale tail.
/// (Measured: per-seed weights, swarm style, or an even mix at a lower rate each left a
/// planted bug or two uncaught within 100 seeds; this mix catches every one.)
const WEIGHTS: [u64; 3] = [2, 1, 2];

impl Nemesis {
    pub(super) fn new(seed: u64) -> Nemesis {
        let mut rng = Rng(seed ^ 0x2545_f491_4f6c_dd1d);
        let rate = [0, 2_000, 5_000, 10_000][rng.below(4) as usize];
        Nemesis {
            rng,
            rate,
            state: Episode::Idle,
            calm_until: 0,
        }
    }

    /// Off: no episode ever starts (runs without faults).
    pub(super) fn off(seed: u64) -> Nemesis {
        Nemesis {
            rate: 0,
            ..Nemesis::new(seed)
        }
    }
}

impl Sim {
    /// Starts or advances this run's episode (once per tick of the faulty phase).
    pub(super) fn nemesis_tick(&mut self, tick: u64) {
        match self.nemesis.state {
            Episode::Idle => {
                if tick >= self.nemesis.calm_until && self.nemesis.rng.chance(self.nemesis.rate) {
                    let [a, d, t] = WEIGHTS;
                    let pick = self.nemesis.rng.below(a + d + t);
                    if pick < a {
                        self.start_acker(tick);
                    } else if pick < a + d {
                        self.start_deposed(tick);
                    } else {
                        self.start_stale(tick);
                    }
                }
            }
            Episode::Acker {
                leader,
                victim,
                deadline,
            } => self.advance_acker(tick, leader, victim, deadline),
            Episode::Standing {
                leader,
                victim,
                stuck,
                deadline,
            } => self.advance_standing(tick, [leader, victim, stuck], deadline),
            Episode::Deposed { old, deadline } => self.advance_deposed(tick, old, deadline),
            Episode::Stale { old, stage, until } => self.advance_stale(tick, old, stage, until),
        }
    }

    fn start_stale(&mut self, tick: u64) {
        if self.leader().is_none() || self.o.replicas < 3 || self.down() > 0 {
            return;
        }
        let Some((old, minority, _)) = self.cut_minority(tick) else {
            return;
        };
        trace(format_args!("t={tick} nemesis: stale tail on {minority:?}"));
        self.nemesis.state = Episode::Stale {
            old,
            stage: Stale::Appending,
            until: tick + 3 + self.nemesis.rng.below(5),
        };
    }

    fn advance_stale(&mut self, tick: u64, old: u64, stage: Stale, until: u64) {
        let (minority, majority) = self.sides(old);
        let core = |p: NodeId| self.nodes[p as usize].replica.as_ref().map(|r| r.core());
        match stage {
            // The cut-off leader appends what its clients send; then its view pauses.
            Stale::Appending if tick >= until => {
                for &p in &minority {
                    self.nodes[p as usize].paused = true;
                }
                self.nemesis.state = Episode::Stale {
                    old,
                    stage: Stale::Paused,
                    until: tick + 300,
                };
            }
            Stale::Appending => {}
            Stale::Paused => {
                let tail = minority
                    .iter()
                    .filter_map(|&p| core(p).map(|c| c.log().last()))
                    .max()
                    .unwrap_or(0);
                // A replica of the new view that compacted past the deposed view's tail
                // (a follower if one did: the leader is the one that keeps choosing).
                let compacted = |leader_too: bool| {
                    majority.iter().copied().find(|&p| {
                        core(p).is_some_and(|c| {
                            (leader_too || !c.is_leader()) && c.log().base() > tail
                        })
                    })
                };
                let source = compacted(false).or_else(|| compacted(true));
                let victims: Vec<NodeId> = majority
                    .iter()
                    .copied()
                    .filter(|&p| Some(p) != source && self.nodes[p as usize].replica.is_some())
                    .collect();
                let Some(source) = source.filter(|_| !victims.is_empty()) else {
                    if tick >= until {
                        self.resume(&minority);
                        self.end_episode(tick);
                    }
                    return;
                };
                if !self.may_lose_memory() {
                    return;
                }
                // A replica of the new view loses its memory, and rebuilds from the
                // compacted one and the deposed view, which resumes reaching it only.
                let victim = victims[self.nemesis.rng.below(victims.len() as u64) as usize];
                self.lose_memory(victim, tick, None);
                for &p in &majority {
                    if p != victim && p != source {
                        self.net.set_link(victim, p, false);
                    }
                }
                // (The deposed view's own cut may have run out while it was paused.)
                for &m in &minority {
                    self.net.set_link(victim, m, true);
                    for &p in majority.iter().filter(|&&p| p != victim) {
                        self.net.set_link(m, p, false);
                    }
                    self.hold_cut(m, tick);
                }
                self.hold_cut(victim, tick);
                trace(format_args!(
                    "t={tick} nemesis: {victim} lost its memory; {source} compacted past the stale tail {tail} of {minority:?}"
                ));
                self.nemesis.state = Episode::Stale {
                    old,
                    stage: Stale::Rebuilding {
                        victim,
                        source,
                        at: tick,
                    },
                    until: tick + 100,
                };
            }
            // Once the rebuild pulls the compacted replica's checkpoint, that replica
            // stops answering it: the pull falls back to another source.
            Stale::Rebuilding { victim, source, at } => {
                // The deposed view resumes once the rebuild's requests wait in its
                // inboxes: it answers them before its clock tells it that it was cut off.
                let asking = core(victim).is_some_and(|c| c.is_recovering());
                let since = tick - at;
                if !asking && since < 10 || asking && since < 3 {
                    return; // (it restarts a tick after the crash)
                }
                let pulling = core(victim).and_then(|c| c.pull_source()) == Some(source);
                let rebuilt = core(victim).is_none_or(|c| !c.is_recovering());
                self.resume(&minority);
                if pulling {
                    self.net.set_link(victim, source, false);
                    trace(format_args!(
                        "t={tick} nemesis: {victim}'s pull from {source} cut"
                    ));
                }
                if pulling || tick >= until || rebuilt {
                    self.end_episode(tick);
                }
            }
        }
    }

    /// Whether one more replica may lose its memory: volatile, while fewer than f are
    /// down or rebuilding (amnesia beyond that loses data by definition); durable, while
    /// none is (a lost data dir is rebuilt from a majority of the others).
    fn may_lose_memory(&self) -> bool {
        match self.o.durability {
            Durability::Volatile => self.down() < (self.o.replicas - 1) / 2,
            Durability::Durable => self.down() == 0,
        }
    }

    fn resume(&mut self, nodes: &[NodeId]) {
        for &p in nodes {
            self.nodes[p as usize].paused = false;
        }
    }

    /// Cuts the leader and f - 1 of its followers (a minority: a bit set, and a list) from
    /// the rest (the second list), for long.
    /// The followers are picked among those in the leader's stream (so that the deposed
    /// view is in normal status); `None` if too few are.
    fn cut_minority(&mut self, tick: u64) -> Option<(u64, Vec<NodeId>, Vec<NodeId>)> {
        let n = self.o.replicas as u64;
        let leader = self.leader()?;
        let ballot = self.nodes[leader as usize]
            .replica
            .as_ref()?
            .core()
            .promised();
        let followers: Vec<NodeId> = (0..n as NodeId)
            .filter(|&p| p != leader)
            .filter(|&p| {
                self.nodes[p as usize].replica.as_ref().is_some_and(|r| {
                    let c = r.core();
                    c.promised() == ballot && !c.is_recovering() && !c.is_blank()
                })
            })
            .collect();
        let want = (n as usize - 1) / 2;
        if followers.len() + 1 < want {
            return None;
        }
        let mut old = 1u64 << leader;
        while (old.count_ones() as usize) < want {
            old |= 1 << followers[self.nemesis.rng.below(followers.len() as u64) as usize];
        }
        let (minority, majority) = self.sides(old);
        let until = tick + 150 + self.nemesis.rng.below(150);
        for &a in &minority {
            for &b in &majority {
                self.net.set_link(a, b, false);
            }
            let c = &mut self.nodes[a as usize].cut_until;
            *c = (*c).max(until);
        }
        Some((old, minority, majority))
    }

    /// The nodes of the minority `old` (a bit set) and of the rest.
    fn sides(&self, old: u64) -> (Vec<NodeId>, Vec<NodeId>) {
        (0..self.o.replicas as NodeId).partition(|&p| old & (1 << p) != 0)
    }

    fn start_deposed(&mut self, tick: u64) {
        let n = self.o.replicas as u64;
        let Some(leader) = self.leader() else {
            return;
        };
        if n < 3 || self.down() > 0 {
            return;
        }
        let Some((old, minority, majority)) = self.cut_minority(tick) else {
            return;
        };
        trace(format_args!(
            "t={tick} nemesis: deposed {minority:?} (leader {leader}) cut from {majority:?}"
        ));
        self.nemesis.state = Episode::Deposed {
            old,
            deadline: tick + 60,
        };
    }

    fn advance_deposed(&mut self, tick: u64, old: u64, deadline: u64) {
        if tick >= deadline {
            self.end_episode(tick);
            return;
        }
        let (minority, majority) = self.sides(old);
        let core = |p: NodeId| self.nodes[p as usize].replica.as_ref().map(|r| r.core());
        let old_last = minority
            .iter()
            .filter_map(|&p| core(p).map(|c| c.log().last()))
            .max()
            .unwrap_or(0);
        let Some((leader, commit)) = majority
            .iter()
            .filter_map(|&p| core(p).filter(|c| c.is_leader()).map(|c| (p, c.commit())))
            .next()
        else {
            return;
        };
        if commit <= old_last {
            return; // nothing chosen by the new view that the deposed one lacks
        }
        // A replica of the new view that holds what it chose loses its memory and
        // restarts at once, reaching only the deposed view (still in normal status for a
        // while: its members have not stood yet).
        let holders: Vec<NodeId> = majority
            .iter()
            .copied()
            .filter(|&p| p != leader && core(p).is_some_and(|c| c.log().last() >= commit))
            .collect();
        if holders.is_empty() || !self.may_lose_memory() {
            return;
        }
        let victim = holders[self.nemesis.rng.below(holders.len() as u64) as usize];
        self.lose_memory(victim, tick, Some(250_000));
        for &p in &majority {
            if p != victim {
                self.net.set_link(victim, p, false);
            }
        }
        for &p in &minority {
            self.net.set_link(victim, p, true);
        }
        self.hold_cut(victim, tick);
        trace(format_args!(
            "t={tick} nemesis: {victim} of the new view (leader {leader}, commit {commit}) lost its memory, reaching only {minority:?}"
        ));
        self.end_episode(tick);
    }

    fn start_acker(&mut self, tick: u64) {
        let n = self.o.replicas as u64;
        let Some(leader) = self.leader() else {
            return;
        };
        if n < 3 || self.down() > 0 {
            return;
        }
        let followers: Vec<NodeId> = (0..n as NodeId).filter(|&p| p != leader).collect();
        let rng = &mut self.nemesis.rng;
        let victim = followers[rng.below(followers.len() as u64) as usize];
        // Sometimes (5 replicas or more) one other follower is cut from the leader for
        // long: a stuck candidate, whose promise is the highest the rebuild hears.
        let stuck = (n >= 5 && rng.chance(500_000)).then(|| {
            let others: Vec<NodeId> = followers.iter().copied().filter(|&p| p != victim).collect();
            others[rng.below(others.len() as u64) as usize]
        });
        if let Some(z) = stuck {
            self.net.set_link(z, leader, false);
            let until = tick + 150 + self.nemesis.rng.below(250);
            let c = &mut self.nodes[z as usize].cut_until;
            *c = (*c).max(until);
        }
        trace(format_args!(
            "t={tick} nemesis: acker {victim} of leader {leader}, stuck candidate {stuck:?}"
        ));
        match stuck {
            // The stuck candidate stands first (an election timeout after its cut).
            Some(z) => {
                self.nemesis.state = Episode::Standing {
                    leader,
                    victim,
                    stuck: z,
                    deadline: tick + 60,
                }
            }
            None => self.lag_paths(tick, leader, victim, None),
        }
    }

    /// Waits for the stuck candidate to stand, then lags the leader's data paths.
    fn advance_standing(&mut self, tick: u64, who: [NodeId; 3], deadline: u64) {
        let [leader, victim, stuck] = who;
        let promised = |p: NodeId| {
            self.nodes[p as usize]
                .replica
                .as_ref()
                .map(|r| (r.core().promised(), r.core().is_leader()))
        };
        let (Some((ballot, true)), Some((theirs, _))) = (promised(leader), promised(stuck)) else {
            self.end_episode(tick);
            return;
        };
        if theirs > ballot {
            self.lag_paths(tick, leader, victim, Some(stuck));
        } else if tick >= deadline {
            self.end_episode(tick);
        }
    }

    /// The leader's writes to everyone but the victim lag, so that the victim's
    /// acknowledgement is the one that counts. One follower's lag ends soon (its
    /// acknowledgement then completes a majority with the victim's old one), while the
    /// victim rebuilds from answers given before; the others' lags outlast the rebuild.
    /// (Longer lags on all would not do: the leader would step down, having heard from no
    /// majority for a heartbeat timeout.)
    fn lag_paths(&mut self, tick: u64, leader: NodeId, victim: NodeId, stuck: Option<NodeId>) {
        let rest: Vec<NodeId> = (0..self.o.replicas as NodeId)
            .filter(|&f| f != leader && f != victim && Some(f) != stuck)
            .collect();
        let completer = rest[self.nemesis.rng.below(rest.len() as u64) as usize];
        for &f in &rest {
            let ticks = if f == completer {
                6 + self.nemesis.rng.below(4)
            } else {
                15 + self.nemesis.rng.below(30)
            };
            self.net.stall(leader, f, ticks * UNITS_PER_TICK);
        }
        self.nemesis.state = Episode::Acker {
            leader,
            victim,
            deadline: tick + 4,
        };
    }

    fn advance_acker(&mut self, tick: u64, leader: NodeId, victim: NodeId, deadline: u64) {
        let core = self.nodes[leader as usize]
            .replica
            .as_ref()
            .map(|r| r.core())
            .filter(|c| c.is_leader());
        let Some(core) = core else {
            self.end_episode(tick); // the leader fell meanwhile
            return;
        };
        let counted = core
            .peer_acks()
            .iter()
            .any(|&(p, a)| p == victim && a > core.commit());
        if !counted {
            if tick >= deadline {
                self.end_episode(tick); // nothing in flight to count: no window
            }
            return;
        }
        if self.nodes[victim as usize].replica.is_none() || !self.may_lose_memory() {
            self.end_episode(tick);
            return;
        }
        // Restart at once: the rebuild runs while the leader still counts the old
        // incarnation's acknowledgement and the other data paths still lag.
        self.lose_memory(victim, tick, Some(250_000));
        self.net.set_link(victim, leader, false);
        self.hold_cut(victim, tick);
        trace(format_args!(
            "t={tick} nemesis: acker {victim} lost its memory, cut from {leader}"
        ));
        self.end_episode(tick);
    }

    /// `victim` crashes and restarts a tick later without its memory (volatile), or
    /// without its data dir (durable: restarted without `--rejoin` with the chance per
    /// million `forgot`, if any, else with it).
    fn lose_memory(&mut self, victim: NodeId, tick: u64, forgot: Option<u64>) {
        self.crash(victim, tick + 1);
        if self.o.durability == Durability::Durable {
            let forgot = forgot.is_some_and(|share| self.nemesis.rng.chance(share));
            self.lose_disk(victim, forgot);
        }
    }

    /// Holds `victim`'s cut links for long (past a whole rebuild).
    fn hold_cut(&mut self, victim: NodeId, tick: u64) {
        let until = tick + 100 + self.nemesis.rng.below(200);
        let c = &mut self.nodes[victim as usize].cut_until;
        *c = (*c).max(until);
    }

    fn end_episode(&mut self, tick: u64) {
        self.nemesis.state = Episode::Idle;
        self.nemesis.calm_until = tick + 100;
    }

    /// Durable mode: `id` (down) lost its data dir; it restarts with `--rejoin`, or, if the
    /// operator `forgot` it, blank.
    pub(super) fn lose_disk(&mut self, id: NodeId, forgot: bool) {
        self.report.blank_boots += u64::from(forgot);
        let mut d = self.nodes[id as usize].disk.lock().unwrap();
        *d = Disk {
            rng: d.rng,
            rejoining: !forgot,
            lost: true,
            ..Disk::default()
        };
        drop(d);
        *self.nodes[id as usize].ckpts.0.lock().unwrap() = MemCheckpoints::default();
        self.report.disk_losses += 1;
    }
}

fn trace(what: std::fmt::Arguments) {
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("{what}");
    }
}
