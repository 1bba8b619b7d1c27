//! Fuzz-style property tests: random and mutated frames against the decoder and against
//! the receiver logic (the "NIC"). No panic, no byte written outside what the receiver
//! reports as landed, and landed writes only where the permission rule allows.

mod common;

use ballot::layout::{
    classify_remote_write, progress_offset, WriteTarget, COMMIT_CELL_OFFSET, RING_OFFSET,
};
use ballot::region::Region;
use ballot::NodeId;
use ballot_tcp::codec::{self, CodecError, Frame, Limits, Status, HEADER_LEN};
use ballot_tcp::nic::{self, Outcome, WritePermission};
use proptest::prelude::*;
use std::sync::OnceLock;

fn shared_region() -> &'static Region {
    static R: OnceLock<std::sync::Arc<Region>> = OnceLock::new();
    R.get_or_init(|| common::region(common::CLUSTER, 0))
}

fn any_limits() -> impl Strategy<Value = Limits> {
    (0usize..1 << 20, 0usize..1 << 12).prop_map(|(max_data, max_control)| Limits {
        max_data,
        max_control,
    })
}

/// An offset near the places that matter.
fn offset(region_len: usize) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        (0u64..64),
        Just(COMMIT_CELL_OFFSET as u64),
        (0u8..18).prop_map(|n| progress_offset(n.min(15)) as u64),
        (RING_OFFSET as u64..RING_OFFSET as u64 + 4096),
        ((region_len - 300) as u64..region_len as u64 + 64),
        any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
enum Spec {
    Write(u64, u64, Vec<u8>),
    Read(u64, u64, u32),
    Control(Vec<u8>),
    Ack(u64, u8),
    Resp(u64, u8, Vec<u8>),
}

fn spec(region_len: usize) -> impl Strategy<Value = Spec> {
    let data = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        4 => (any::<u64>(), offset(region_len), data.clone()).prop_map(|(t, o, d)| Spec::Write(t, o, d)),
        2 => (any::<u64>(), offset(region_len), 0u32..600).prop_map(|(t, o, l)| Spec::Read(t, o, l)),
        1 => data.clone().prop_map(Spec::Control),
        1 => (any::<u64>(), 0u8..3).prop_map(|(t, s)| Spec::Ack(t, s)),
        1 => (any::<u64>(), 0u8..3, data).prop_map(|(t, s, d)| Spec::Resp(t, s, d)),
    ]
}

fn status(s: u8) -> Status {
    [Status::Ok, Status::PermissionDenied, Status::OutOfBounds][s as usize % 3]
}

fn encode_spec(s: &Spec, out: &mut Vec<u8>) {
    let f = match s {
        Spec::Write(t, o, d) => Frame::Write {
            token: *t,
            offset: *o,
            data: d,
        },
        Spec::Read(t, o, l) => Frame::Read {
            token: *t,
            offset: *o,
            len: *l,
        },
        Spec::Control(d) => Frame::Control { bytes: d },
        Spec::Ack(t, s) => Frame::WriteAck {
            token: *t,
            status: status(*s),
        },
        Spec::Resp(t, s, d) => Frame::ReadResp {
            token: *t,
            status: status(*s),
            data: d,
        },
    };
    codec::encode(&f, out).unwrap();
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..40)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

fn mutate(buf: &mut Vec<u8>, m: &Mutation) {
    if buf.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, b) => {
            let i = i.index(buf.len());
            buf[i] ^= 1 << b;
        }
        Mutation::Set(i, b) => {
            let i = i.index(buf.len());
            buf[i] = *b;
        }
        Mutation::Truncate(i) => buf.truncate(i.index(buf.len())),
        Mutation::Insert(i, b) => {
            let i = i.index(buf.len());
            buf.splice(i..i, b.iter().copied());
        }
    }
}

/// Decodes `bytes`, checking what the codec promises of any result.
fn check_decode(bytes: &[u8], limits: &Limits) -> Result<(), TestCaseError> {
    match codec::decode(bytes, limits) {
        Ok((f, used)) => {
            prop_assert!(used >= HEADER_LEN && used <= bytes.len());
            let mut again = Vec::new();
            codec::encode(&f, &mut again).unwrap();
            prop_assert_eq!(&again[..], &bytes[..used], "re-encoding differs");
        }
        Err(CodecError::Incomplete { need }) => prop_assert!(need > bytes.len()),
        Err(_) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoder_is_total_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                        limits in any_limits()) {
        check_decode(&bytes, &limits)?;
    }

    #[test]
    fn frames_round_trip_and_mutations_are_safe(s in spec(1 << 22), ms in proptest::collection::vec(mutation(), 0..4)) {
        let limits = Limits::for_region(1 << 22);
        let mut buf = Vec::new();
        encode_spec(&s, &mut buf);
        check_decode(&buf, &limits)?;
        let (_, used) = codec::decode(&buf, &limits).unwrap();
        prop_assert_eq!(used, buf.len());
        for m in &ms {
            mutate(&mut buf, m);
            check_decode(&buf, &limits)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A stream of (possibly mutated) frames fed to the receiver logic, exactly as the
    /// receiver thread does: the region changes only where a write was reported landed,
    /// landed writes obey the permission rule, and every response is a well-formed frame.
    #[test]
    fn receiver_writes_only_what_it_reports(
        specs in proptest::collection::vec((spec(ballot::layout::RingGeometry::new(1 << 16, 64).unwrap().region_bytes()),
                                            proptest::option::of(mutation()),
                                            0u8..20, proptest::option::of(0u8..4)), 1..12),
    ) {
        let region = shared_region();
        let len = region.len();
        let limits = Limits::for_region(len);
        let mut model = vec![0u8; len];
        region.read(0, &mut model).unwrap();
        let perm = WritePermission::new(None);
        let mut out = Vec::new();
        for (s, m, from, writer) in &specs {
            let from = *from as NodeId;
            perm.set(writer.map(|w| w as NodeId));
            let mut buf = Vec::new();
            encode_spec(s, &mut buf);
            if let Some(m) = m {
                mutate(&mut buf, m);
            }
            let mut at = 0;
            while let Ok((frame, used)) = codec::decode(&buf[at..], &limits) {
                at += used;
                out.clear();
                let outcome = nic::apply(&frame, from, region, &perm, &mut out);
                if let Outcome::Landed = outcome {
                    let Frame::Write { offset, data, .. } = frame else {
                        return Err(TestCaseError::fail("landed a non-write"));
                    };
                    let off = offset as usize;
                    let class = classify_remote_write(from, off, data.len(), len);
                    prop_assert!(match class {
                        Ok(WriteTarget::OwnProgress) => true,
                        Ok(WriteTarget::Ring) => perm.get() == Some(from),
                        Err(_) => false,
                    }, "landed against the rule: {:?} from {}", class, from);
                    model[off..off + data.len()].copy_from_slice(data);
                }
                // The response, if any, is exactly one well-formed response frame.
                if !out.is_empty() {
                    let (resp, used) = codec::decode(&out, &limits).unwrap();
                    prop_assert_eq!(used, out.len());
                    let is_response = matches!(resp, Frame::WriteAck { .. } | Frame::ReadResp { .. });
                    prop_assert!(is_response, "not a response: {}", resp.describe());
                }
                if matches!(outcome, Outcome::OutOfBounds | Outcome::Unexpected) {
                    break; // the receiver closes the connection here
                }
            }
        }
        let mut now = vec![0u8; len];
        region.read(0, &mut now).unwrap();
        // Compare in chunks so that a failure names a place instead of dumping 4 MiB.
        for (i, (a, b)) in now.chunks(4096).zip(model.chunks(4096)).enumerate() {
            prop_assert!(a == b, "region chunk {} changed without a landed write", i);
        }
    }
}
