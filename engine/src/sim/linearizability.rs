//! The one linearizability checker, shared by the simulator and the real-process tests
//! (`node/tests/cluster.rs`): a history of [`Call`]s is checked against a sequential
//! specification with stateright's [`LinearizabilityTester`].
//!
//! Calls are fed to the tester in time order; at equal instants returns go before
//! invokes (conservative: two calls that merely touch are not taken as overlapping).
//! Linearizability is compositional, so callers check each key's history on its own.

use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

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
    S: SequentialSpec + Clone,
    S::Op: Clone + std::fmt::Debug,
    S::Ret: Clone + std::fmt::Debug + PartialEq,
    T: Ord + Copy,
{
    let calls: Vec<_> = history.into_iter().collect();
    // (time, is invoke, call): `false < true` puts returns first at equal instants.
    let mut events: Vec<(T, bool, usize)> = Vec::with_capacity(calls.len() * 2);
    for (i, c) in calls.iter().enumerate() {
        events.push((c.invoked, true, i));
        if let Some((t, _)) = &c.returned {
            events.push((*t, false, i));
        }
    }
    events.sort_unstable();
    let mut t = LinearizabilityTester::new(spec);
    for (_, invoke, i) in events {
        let c = &calls[i];
        let r = if invoke {
            t.on_invoke(c.thread, c.op.clone()).map(|_| ())
        } else {
            let (_, ret) = c.returned.as_ref().expect("a return event has a result");
            t.on_return(c.thread, ret.clone()).map(|_| ())
        };
        r.map_err(Violation::Malformed)?;
    }
    if t.is_consistent() {
        Ok(t.len())
    } else {
        Err(Violation::NotLinearizable { ops: t.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register holding a number.
    #[derive(Debug, Clone, Default)]
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
}
