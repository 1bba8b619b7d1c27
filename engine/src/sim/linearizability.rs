//! The one linearizability checker, shared by the simulator and the real-process tests
//! (`node/tests/`): a history of [`Call`]s is checked against a sequential specification
//! (stateright's [`SequentialSpec`]).
//!
//! The search is Wing and Gong's, with Lowe's memo (as in Porcupine): calls are taken in
//! time order, at equal instants returns before invokes (conservative: two calls that
//! merely touch are not taken as overlapping); the search linearizes a call whose invoke
//! comes before the first return still ahead, backtracks when it reaches that return, and
//! never visits the same (set of calls linearized, state) twice. Without the memo the
//! search is exponential in the calls that overlap (many in flight at once: pipelined
//! clients). Calls that never returned may take effect at any point after their invoke, or
//! not at all. Linearizability is compositional, so callers check each key's history on its
//! own.

use std::collections::HashSet;
use std::hash::Hash;

pub use stateright::semantics::SequentialSpec;

/// One client call: which thread made it, what it asked, when it was invoked and, if it
/// returned, when and with what. A call that never returned may or may not have taken
/// effect. `T` is any totally ordered clock (simulator ticks, `Instant`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call<Op, Ret, T> {
    /// The calling client: at most one call of a thread is in flight.
    pub thread: u64,
    /// What it asked.
    pub op: Op,
    /// When it was invoked.
    pub invoked: T,
    /// When it returned, and with what; `None`: it never did.
    pub returned: Option<(T, Ret)>,
}

/// Why a history failed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Not a well-formed history (a thread with two calls in flight, a return without
    /// an invoke, ...): the tester's message.
    Malformed(String),
    /// No order of the calls consistent with real time and the spec gives their results.
    NotLinearizable {
        /// Calls in the history.
        ops: usize,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "history malformed: {e}"),
            Self::NotLinearizable { ops } => {
                write!(f, "history of {ops} ops has no linearization")
            }
        }
    }
}

impl std::error::Error for Violation {}

/// Checks that `history` is linearizable with respect to `spec` (its initial state).
/// Returns the number of calls checked.
pub fn check<S, T>(
    history: impl IntoIterator<Item = Call<S::Op, S::Ret, T>>,
    spec: S,
) -> Result<usize, Violation>
where
    S: SequentialSpec + Clone + Hash + Eq,
    S::Op: Clone + std::fmt::Debug,
    S::Ret: Clone + std::fmt::Debug + PartialEq,
    T: Ord + Copy + std::fmt::Debug,
{
    let calls: Vec<_> = history.into_iter().collect();
    well_formed(&calls)?;
    if search(&calls, spec) {
        Ok(calls.len())
    } else {
        Err(Violation::NotLinearizable { ops: calls.len() })
    }
}

/// At most one call of a thread in flight: each of its calls is invoked after the one
/// before returned (at the same instant counts as after), and only its last may never
/// return.
fn well_formed<Op: std::fmt::Debug, Ret, T: Ord + Copy + std::fmt::Debug>(
    calls: &[Call<Op, Ret, T>],
) -> Result<(), Violation> {
    let mut by_thread: Vec<(u64, T, usize)> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| (c.thread, c.invoked, i))
        .collect();
    by_thread.sort_unstable_by_key(|&(thread, invoked, _)| (thread, invoked));
    for w in by_thread.windows(2) {
        let (prev, next) = (&calls[w[0].2], &calls[w[1].2]);
        if w[0].0 != w[1].0 {
            continue;
        }
        match &prev.returned {
            Some((t, _)) if *t <= next.invoked => {}
            _ => {
                return Err(Violation::Malformed(format!(
                    "thread {} invoked {:?} at {:?} while {:?} (invoked at {:?}) was in flight",
                    next.thread, next.op, next.invoked, prev.op, prev.invoked
                )))
            }
        }
        if let Some((t, _)) = &prev.returned {
            if *t < prev.invoked {
                return Err(Violation::Malformed(format!(
                    "{:?} returned before it was invoked",
                    prev.op
                )));
            }
        }
    }
    Ok(())
}

/// The events of the search, in a doubly linked list (index 0: the head).
struct Node {
    prev: usize,
    next: usize,
    /// The call, and whether this is its invoke.
    call: usize,
    invoke: bool,
    /// Invoke: the index of its return (`usize::MAX`: none, it never returned).
    ret: usize,
}

const NONE: usize = usize::MAX;

/// Wing and Gong's search with Lowe's memo; `true` if a linearization exists.
fn search<S, T>(calls: &[Call<S::Op, S::Ret, T>], spec: S) -> bool
where
    S: SequentialSpec + Clone + Hash + Eq,
    S::Ret: PartialEq,
    T: Ord + Copy,
{
    // (time, order, call): at equal instants returns (0) before invokes (1), except the
    // return of a call invoked at that same instant (2), which follows its invoke.
    let mut events: Vec<(T, u8, usize)> = Vec::with_capacity(calls.len() * 2);
    for (i, c) in calls.iter().enumerate() {
        events.push((c.invoked, 1, i));
        if let Some((t, _)) = &c.returned {
            events.push((*t, if *t == c.invoked { 2 } else { 0 }, i));
        }
    }
    events.sort_unstable();
    let mut nodes = Vec::with_capacity(events.len() + 1);
    nodes.push(Node {
        prev: NONE,
        next: NONE,
        call: NONE,
        invoke: false,
        ret: NONE,
    });
    let mut invoke_at = vec![NONE; calls.len()];
    for (k, &(_, order, call)) in events.iter().enumerate() {
        let (at, invoke) = (k + 1, order == 1);
        nodes[at - 1].next = at;
        nodes.push(Node {
            prev: at - 1,
            next: NONE,
            call,
            invoke,
            ret: NONE,
        });
        if invoke {
            invoke_at[call] = at;
        } else {
            nodes[invoke_at[call]].ret = at;
        }
    }
    // Unlinks (lift) or relinks (unlift) a call's invoke and its return.
    fn unlink(nodes: &mut [Node], at: usize) {
        let (p, n) = (nodes[at].prev, nodes[at].next);
        nodes[p].next = n;
        if n != NONE {
            nodes[n].prev = p;
        }
    }
    fn relink(nodes: &mut [Node], at: usize) {
        let (p, n) = (nodes[at].prev, nodes[at].next);
        nodes[p].next = at;
        if n != NONE {
            nodes[n].prev = at;
        }
    }
    let mut returned_left = calls.iter().filter(|c| c.returned.is_some()).count();
    let mut linearized = vec![0u64; calls.len().div_ceil(64)];
    let mut memo: HashSet<(Vec<u64>, S)> = HashSet::new();
    let mut stack: Vec<(usize, S)> = Vec::new();
    let mut state = spec;
    let mut at = nodes[0].next;
    // Every call that returned is linearized: the ones that never did go after them all
    // (any result goes for them) or never take effect.
    while returned_left > 0 {
        let node = &nodes[at];
        if node.invoke {
            let c = &calls[node.call];
            let mut next_state = state.clone();
            let ok = match &c.returned {
                Some((_, ret)) => next_state.is_valid_step(&c.op, ret),
                None => {
                    next_state.invoke(&c.op);
                    true
                }
            };
            if ok {
                let (word, bit) = (node.call / 64, 1u64 << (node.call % 64));
                linearized[word] |= bit;
                if memo.insert((linearized.clone(), next_state.clone())) {
                    let ret = node.ret;
                    stack.push((at, std::mem::replace(&mut state, next_state)));
                    unlink(&mut nodes, at);
                    if ret != NONE {
                        unlink(&mut nodes, ret);
                        returned_left -= 1;
                    }
                    at = nodes[0].next;
                    continue;
                }
                linearized[word] &= !bit;
            }
            at = nodes[at].next;
        } else {
            // A return ahead of every call still to linearize: undo the last choice.
            let Some((inv, before)) = stack.pop() else {
                return false;
            };
            state = before;
            let call = nodes[inv].call;
            linearized[call / 64] &= !(1u64 << (call % 64));
            let ret = nodes[inv].ret;
            if ret != NONE {
                relink(&mut nodes, ret);
                returned_left += 1;
            }
            relink(&mut nodes, inv);
            at = nodes[inv].next;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register holding a number.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
    struct Reg(u64);

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Write(u64),
        Read,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Ret {
        Ok,
        Value(u64),
    }

    impl SequentialSpec for Reg {
        type Op = Op;
        type Ret = Ret;
        fn invoke(&mut self, op: &Op) -> Ret {
            match *op {
                Op::Write(v) => {
                    self.0 = v;
                    Ret::Ok
                }
                Op::Read => Ret::Value(self.0),
            }
        }
    }

    fn call(thread: u64, op: Op, i: u64, r: Option<(u64, Ret)>) -> Call<Op, Ret, u64> {
        Call {
            thread,
            op,
            invoked: i,
            returned: r,
        }
    }

    #[test]
    fn stale_read_after_a_completed_write_is_caught() {
        let h = [
            call(1, Op::Write(5), 0, Some((1, Ret::Ok))),
            call(2, Op::Read, 2, Some((3, Ret::Value(0)))),
        ];
        assert_eq!(
            check(h, Reg::default()),
            Err(Violation::NotLinearizable { ops: 2 })
        );
    }

    #[test]
    fn overlapping_calls_may_go_either_way() {
        let h = [
            call(1, Op::Write(5), 0, Some((3, Ret::Ok))),
            call(2, Op::Read, 1, Some((2, Ret::Value(0)))),
        ];
        assert_eq!(check(h, Reg::default()), Ok(2));
    }

    #[test]
    fn touching_calls_do_not_overlap() {
        // The write returns at 1, the read is invoked at 1: the read must see it.
        let h = [
            call(1, Op::Write(5), 0, Some((1, Ret::Ok))),
            call(2, Op::Read, 1, Some((2, Ret::Value(0)))),
        ];
        assert!(check(h, Reg::default()).is_err());
    }

    #[test]
    fn unreturned_calls_may_have_taken_effect() {
        let h = [
            call(1, Op::Write(5), 0, None),
            call(2, Op::Read, 2, Some((3, Ret::Value(5)))),
        ];
        assert_eq!(check(h, Reg::default()), Ok(2));
    }

    #[test]
    fn two_calls_in_flight_on_one_thread_are_malformed() {
        let h = [
            call(1, Op::Write(5), 0, Some((3, Ret::Ok))),
            call(1, Op::Read, 1, Some((2, Ret::Value(0)))),
        ];
        assert!(matches!(
            check(h, Reg::default()),
            Err(Violation::Malformed(_))
        ));
    }

    /// Every order of the calls that respects real time (returns before invokes at equal
    /// instants), calls that never returned placed anywhere or left out.
    fn brute(calls: &[Call<Op, Ret, u64>], left: &mut Vec<usize>, reg: Reg) -> bool {
        if left.iter().all(|&i| calls[i].returned.is_none()) {
            return true;
        }
        for k in 0..left.len() {
            let c = &calls[left[k]];
            let blocked = left
                .iter()
                .any(|&j| j != left[k] && calls[j].returned.is_some_and(|(t, _)| t <= c.invoked));
            if blocked {
                continue;
            }
            let mut next = reg.clone();
            let got = next.invoke(&c.op);
            if c.returned.is_some_and(|(_, r)| r != got) {
                continue;
            }
            let i = left.remove(k);
            let ok = brute(calls, left, next);
            left.insert(k, i);
            if ok {
                return true;
            }
        }
        false
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3000 {
            let n = 1 + rand(6) as usize;
            let calls: Vec<_> = (0..n)
                .map(|i| {
                    let op = if rand(2) == 0 {
                        Op::Write(1 + rand(3))
                    } else {
                        Op::Read
                    };
                    let inv = rand(8);
                    let ret = match (rand(5), op) {
                        (0, _) => None,
                        (_, Op::Write(_)) => Some((inv + 1 + rand(4), Ret::Ok)),
                        (_, Op::Read) => Some((inv + 1 + rand(4), Ret::Value(rand(4)))),
                    };
                    call(i as u64, op, inv, ret)
                })
                .collect();
            let want = brute(&calls, &mut (0..n).collect(), Reg::default());
            assert_eq!(
                check(calls.clone(), Reg::default()).is_ok(),
                want,
                "{calls:?}"
            );
            if want {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 500 && no > 500, "{yes} linearizable, {no} not");
    }

    #[test]
    fn many_overlapping_calls_are_checked() {
        // 4000 calls in rounds of 8 that all overlap: 4 writes of fresh values and 4 reads
        // of the round's third; without the memo the search would try the orders of every
        // round again for each failed attempt at a later one.
        let mut h = Vec::new();
        let mut thread = 0;
        for round in 0..500u64 {
            let t = round * 10;
            for w in 0..4 {
                thread += 1;
                let v = round * 4 + w + 1;
                h.push(call(thread, Op::Write(v), t, Some((t + 5, Ret::Ok))));
            }
            for _ in 0..4 {
                thread += 1;
                let v = round * 4 + 3;
                h.push(call(thread, Op::Read, t + 1, Some((t + 6, Ret::Value(v)))));
            }
        }
        assert_eq!(check(h.clone(), Reg::default()), Ok(4000));
        // A read of a value from a round that was over: no linearization.
        h.push(call(
            thread + 1,
            Op::Read,
            5000,
            Some((5001, Ret::Value(3))),
        ));
        assert!(check(h, Reg::default()).is_err());
    }
}
