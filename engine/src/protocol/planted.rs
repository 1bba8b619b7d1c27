//! Planted bugs: deliberate protocol bugs that measure the simulator.

/// Deliberate protocol bugs, one per rule the protocol rests on, to measure the
/// simulator: each must be caught by its end-to-end checks (`ballot-sim --plant-bug NAME`,
/// `engine/tests/planted.rs`). Off in every real configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PlantedBugs {
    /// The acceptor promises any ballot, even one below its promise.
    pub ignore_promise: bool,
    /// The leader counts a quorum one short of a majority.
    pub short_quorum: bool,
    /// A replica that installs a checkpoint believes it covers one entry more than it does.
    pub checkpoint_off_by_one: bool,
    /// The leader counts its own acknowledgement twice.
    pub self_counted_twice: bool,
    /// The leader commits one entry beyond what a majority acknowledged.
    pub commit_off_by_one: bool,
    /// Phase 1 adopts, per index, the value of the lowest ballot instead of the highest.
    pub adopt_lowest_ballot: bool,
    /// The fence does not revoke remote write permission.
    pub fence_no_revoke: bool,
    /// The fence does not drain the ring before the promise.
    pub fence_no_drain: bool,
    /// What a fence decides runs after actions queued before it.
    pub fence_decisions_late: bool,
    /// Recovery finishes on answers from one replica fewer than a majority of the others.
    pub recovery_short_quorum: bool,
    /// Recovery does not wait for the answer of the leader the answers name.
    pub recovery_no_leader_wait: bool,
    /// A replica that lost its memory votes at once instead of rebuilding first.
    pub amnesia_votes: bool,
    /// A candidate adopts from an acceptor that compacted past its `from`.
    pub phase1_ignores_base: bool,
    /// Recovery finishes on a checkpoint older than the most compacted answer.
    pub recovery_ignores_base: bool,
    /// A follower learns a commit index beyond what it received in the current stream.
    pub follower_commit_uncapped: bool,
    /// A follower restarts its stream on a late Resync or NeedCheckpoint of another stream.
    pub restart_stale_stream: bool,
    /// Replicas in no normal status (candidates, unestablished promises) answer recoveries.
    pub recovery_answers_unestablished: bool,
    /// Blank votes (no memory) count even from a replica known to have had a memory.
    pub accept_blank_votes: bool,
    /// A durable replica restored from its disk remembers, even one that was blank.
    pub restore_forgets_blank: bool,
}

/// Turns one planted bug on.
pub type BugSwitch = fn(&mut PlantedBugs);

impl PlantedBugs {
    /// Every planted bug by name, with the switch that turns it on.
    pub const ALL: &'static [(&'static str, BugSwitch)] = &[
        ("ignore-promise", |b| b.ignore_promise = true),
        ("short-quorum", |b| b.short_quorum = true),
        ("checkpoint-off-by-one", |b| b.checkpoint_off_by_one = true),
        ("self-counted-twice", |b| b.self_counted_twice = true),
        ("commit-off-by-one", |b| b.commit_off_by_one = true),
        ("adopt-lowest-ballot", |b| b.adopt_lowest_ballot = true),
        ("fence-no-revoke", |b| b.fence_no_revoke = true),
        ("fence-no-drain", |b| b.fence_no_drain = true),
        ("fence-decisions-late", |b| b.fence_decisions_late = true),
        ("recovery-short-quorum", |b| b.recovery_short_quorum = true),
        ("recovery-no-leader-wait", |b| {
            b.recovery_no_leader_wait = true
        }),
        ("amnesia-votes", |b| b.amnesia_votes = true),
        ("phase1-ignores-base", |b| b.phase1_ignores_base = true),
        ("recovery-ignores-base", |b| b.recovery_ignores_base = true),
        ("follower-commit-uncapped", |b| {
            b.follower_commit_uncapped = true
        }),
        ("restart-stale-stream", |b| b.restart_stale_stream = true),
        ("recovery-answers-unestablished", |b| {
            b.recovery_answers_unestablished = true
        }),
        ("accept-blank-votes", |b| b.accept_blank_votes = true),
        ("restore-forgets-blank", |b| b.restore_forgets_blank = true),
    ];

    /// The bug named `name` (as in [`PlantedBugs::ALL`]).
    pub fn named(name: &str) -> Option<PlantedBugs> {
        let (_, set) = Self::ALL.iter().find(|(n, _)| *n == name)?;
        let mut b = PlantedBugs::default();
        set(&mut b);
        Some(b)
    }

    /// The names of the bugs that are on (a bug is on when switching it on changes nothing).
    pub fn names(&self) -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|(_, set)| {
                let mut b = *self;
                set(&mut b);
                b == *self
            })
            .map(|(n, _)| *n)
            .collect()
    }

    /// Whether any bug is on.
    pub fn any(&self) -> bool {
        *self != PlantedBugs::default()
    }
}
