//! The receiving side's "NIC": applies a decoded request frame to the local region.
//!
//! This is plain logic over a [`Region`] and a [`WritePermission`], with no socket, so that
//! tests can feed it arbitrary frames. Every remote write is classified with
//! [`ballot::layout::classify_remote_write`] (the rule every fabric shares) before it
//! touches memory: ring and commit-cell writes need the sender to hold write permission,
//! a write into the sender's own progress cell is always allowed, anything else is out of
//! bounds.

use crate::codec::{self, Frame, Status};
use ballot::layout::{classify_remote_write, WriteTarget};
use ballot::region::Region;
use ballot::NodeId;
use std::sync::RwLock;

/// Who may write the local ring and commit cell.
///
/// Receivers land ring writes while holding the read side of the lock, after checking the
/// writer under it; [`WritePermission::set`] takes the write side. So when `set` returns, no
/// write checked under the old permission is still landing, and none from a revoked peer
/// can land any more.
#[derive(Debug, Default)]
pub struct WritePermission {
    writer: RwLock<Option<NodeId>>,
}

impl WritePermission {
    pub fn new(writer: Option<NodeId>) -> Self {
        Self {
            writer: RwLock::new(writer),
        }
    }

    pub fn set(&self, writer: Option<NodeId>) {
        *self.writer.write().unwrap_or_else(|e| e.into_inner()) = writer;
    }

    pub fn get(&self) -> Option<NodeId> {
        *self.writer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Lands `data` at `offset` if `from` holds permission; the check and the write happen
    /// under one read guard. Returns whether it landed.
    fn land_if_writer(&self, from: NodeId, region: &Region, offset: usize, data: &[u8]) -> bool {
        let g = self.writer.read().unwrap_or_else(|e| e.into_inner());
        if *g != Some(from) {
            return false;
        }
        region.write(offset, data).is_ok()
    }
}

/// What applying a frame did. The response (if any) has been appended to `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// A WRITE landed; ACK appended.
    Landed,
    /// A READ was served; its bytes appended.
    Served,
    /// A CONTROL message to deliver to the local driver.
    Message(&'a [u8]),
    /// A ring write from a peer without permission; NACK(PermissionDenied) appended, nothing
    /// written.
    Denied,
    /// A WRITE or READ outside the region, or into a part no peer may write;
    /// NACK(OutOfBounds) appended, nothing written. The connection should be closed.
    OutOfBounds,
    /// A response frame sent to the NIC: a protocol violation, nothing appended. The
    /// connection should be closed.
    Unexpected,
}

/// Applies one request frame from authenticated peer `from` to `region`, appending the
/// response frame to `out`. Total: no frame panics or touches memory outside the region.
pub fn apply<'a>(
    frame: &Frame<'a>,
    from: NodeId,
    region: &Region,
    perm: &WritePermission,
    out: &mut Vec<u8>,
) -> Outcome<'a> {
    let ack = |out: &mut Vec<u8>, token, status| {
        codec::encode(&Frame::WriteAck { token, status }, out).expect("ack has no payload")
    };
    match *frame {
        Frame::Write {
            token,
            offset,
            data,
        } => {
            let Ok(off) = usize::try_from(offset) else {
                ack(out, token, Status::OutOfBounds);
                return Outcome::OutOfBounds;
            };
            let landed = match classify_remote_write(from, off, data.len(), region.len()) {
                Err(_) => {
                    ack(out, token, Status::OutOfBounds);
                    return Outcome::OutOfBounds;
                }
                Ok(WriteTarget::OwnProgress) => region.write(off, data).is_ok(),
                Ok(WriteTarget::Ring) => {
                    if !perm.land_if_writer(from, region, off, data) {
                        ack(out, token, Status::PermissionDenied);
                        return Outcome::Denied;
                    }
                    true
                }
            };
            if landed {
                ack(out, token, Status::Ok);
                Outcome::Landed
            } else {
                ack(out, token, Status::OutOfBounds);
                Outcome::OutOfBounds
            }
        }
        Frame::Read { token, offset, len } => {
            let len = len as usize;
            let in_bounds = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(len).map(|end| (o, end)))
                .filter(|&(_, end)| end <= region.len());
            let Some((off, _)) = in_bounds else {
                let f = Frame::ReadResp {
                    token,
                    status: Status::OutOfBounds,
                    data: &[],
                };
                codec::encode(&f, out).expect("empty payload");
                return Outcome::OutOfBounds;
            };
            let f = Frame::ReadResp {
                token,
                status: Status::Ok,
                data: &[],
            };
            let start = out.len();
            codec::encode(&f, out).expect("empty payload");
            // Patch the length, then copy the bytes straight from the region.
            out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
            let at = out.len();
            out.resize(at + len, 0);
            region
                .read(off, &mut out[at..])
                .expect("bounds checked above");
            Outcome::Served
        }
        Frame::Control { bytes } => Outcome::Message(bytes),
        Frame::WriteAck { .. } | Frame::ReadResp { .. } => Outcome::Unexpected,
    }
}
