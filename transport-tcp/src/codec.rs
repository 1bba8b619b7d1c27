//! The TCP fabric's frame codec.
//!
//! Every frame is a fixed 24-byte little-endian header, followed by `len` payload bytes for
//! the frames that carry data (see `docs/tcp-fabric.md`):
//!
//! ```text
//! 0   op      u8    1 WRITE, 2 READ, 3 CONTROL, 4 WRITE_ACK, 5 READ_RESP
//! 1   status  u8    responses only: 0 OK, 1 PERMISSION_DENIED, 2 OUT_OF_BOUNDS; 0 in requests
//! 2   zero    u16   reserved, must be 0
//! 4   len     u32   WRITE/CONTROL/READ_RESP: payload bytes that follow; READ: bytes asked for
//! 8   token   u64   the poster's token, echoed by the response (0 for CONTROL)
//! 16  offset  u64   WRITE/READ: offset in the target region (0 otherwise)
//! ```
//!
//! The decoders are total: any byte string yields a frame, a typed error, or
//! [`CodecError::Incomplete`] (more bytes are needed), never a panic. Lengths are bounded by
//! [`Limits`] before any payload is buffered.

use std::fmt;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Write = 1,
    Read = 2,
    Control = 3,
    WriteAck = 4,
    ReadResp = 5,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Control,
            4 => Op::WriteAck,
            5 => Op::ReadResp,
            _ => return None,
        })
    }
    /// Whether the frame is a request (client to NIC) rather than a response.
    pub fn is_request(self) -> bool {
        matches!(self, Op::Write | Op::Read | Op::Control)
    }
}

/// Outcome carried by a response frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    PermissionDenied = 1,
    OutOfBounds = 2,
}

impl Status {
    fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::PermissionDenied,
            2 => Status::OutOfBounds,
            _ => return None,
        })
    }
}

/// Upper bounds on lengths, checked on the header before any payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest WRITE payload, READ length and READ_RESP payload (the region size on the
    /// receiving side).
    pub max_data: usize,
    /// Largest CONTROL payload ([`ballot::fabric::MAX_CONTROL`]).
    pub max_control: usize,
}

impl Limits {
    pub fn for_region(region_len: usize) -> Limits {
        Limits {
            max_data: region_len,
            max_control: ballot::fabric::MAX_CONTROL,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub op: Op,
    pub status: Status,
    pub len: u32,
    pub token: u64,
    pub offset: u64,
}

impl Header {
    /// Payload bytes that follow the header on the wire.
    pub fn payload_len(&self) -> usize {
        match self.op {
            Op::Write | Op::Control | Op::ReadResp => self.len as usize,
            Op::Read | Op::WriteAck => 0,
        }
    }
    /// Header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }
}

/// A complete frame, borrowing its payload from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Write {
        token: u64,
        offset: u64,
        data: &'a [u8],
    },
    Read {
        token: u64,
        offset: u64,
        len: u32,
    },
    Control {
        bytes: &'a [u8],
    },
    WriteAck {
        token: u64,
        status: Status,
    },
    ReadResp {
        token: u64,
        status: Status,
        data: &'a [u8],
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// Not an error yet: at least `need` bytes in total are required.
    Incomplete {
        need: usize,
    },
    UnknownOp(u8),
    UnknownStatus(u8),
    /// A field that must be zero for this op is not.
    NonZero {
        op: Op,
        field: &'static str,
    },
    /// A length above the limit.
    TooLong {
        op: Op,
        len: u64,
        max: usize,
    },
    /// A payload that cannot be encoded (longer than `u32::MAX`).
    Unencodable {
        len: usize,
    },
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete { need } => write!(f, "incomplete frame: need {need} bytes"),
            Self::UnknownOp(b) => write!(f, "unknown op {b}"),
            Self::UnknownStatus(b) => write!(f, "unknown status {b}"),
            Self::NonZero { op, field } => write!(f, "{op:?} frame with non-zero {field}"),
            Self::TooLong { op, len, max } => {
                write!(f, "{op:?} frame of {len} bytes exceeds {max}")
            }
            Self::Unencodable { len } => write!(f, "payload of {len} bytes cannot be framed"),
        }
    }
}
impl std::error::Error for CodecError {}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes and validates the header at the start of `b`.
pub fn decode_header(b: &[u8], limits: &Limits) -> Result<Header, CodecError> {
    if b.len() < HEADER_LEN {
        return Err(CodecError::Incomplete { need: HEADER_LEN });
    }
    let op = Op::from_u8(b[0]).ok_or(CodecError::UnknownOp(b[0]))?;
    let status = Status::from_u8(b[1]).ok_or(CodecError::UnknownStatus(b[1]))?;
    if b[2] != 0 || b[3] != 0 {
        return Err(CodecError::NonZero {
            op,
            field: "reserved",
        });
    }
    let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let token = rd_u64(b, 8);
    let offset = rd_u64(b, 16);
    let nonzero = |field| Err(CodecError::NonZero { op, field });
    if op.is_request() && status != Status::Ok {
        return nonzero("status");
    }
    if !matches!(op, Op::Write | Op::Read) && offset != 0 {
        return nonzero("offset");
    }
    if op == Op::Control && token != 0 {
        return nonzero("token");
    }
    if op == Op::WriteAck && len != 0 {
        return nonzero("len");
    }
    if op == Op::ReadResp && status != Status::Ok && len != 0 {
        return nonzero("len");
    }
    let max = match op {
        Op::Control => limits.max_control,
        _ => limits.max_data,
    };
    if len as u64 > max as u64 {
        return Err(CodecError::TooLong {
            op,
            len: len as u64,
            max,
        });
    }
    Ok(Header {
        op,
        status,
        len,
        token,
        offset,
    })
}

/// Decodes one frame from the start of `b`. Returns the frame and the bytes it used.
pub fn decode<'a>(b: &'a [u8], limits: &Limits) -> Result<(Frame<'a>, usize), CodecError> {
    let h = decode_header(b, limits)?;
    let total = h.frame_len();
    if b.len() < total {
        return Err(CodecError::Incomplete { need: total });
    }
    let payload = &b[HEADER_LEN..total];
    Ok((frame_of(&h, payload), total))
}

/// Pairs a validated header with its payload (`payload.len()` must be `h.payload_len()`).
pub fn frame_of<'a>(h: &Header, payload: &'a [u8]) -> Frame<'a> {
    debug_assert_eq!(payload.len(), h.payload_len());
    match h.op {
        Op::Write => Frame::Write {
            token: h.token,
            offset: h.offset,
            data: payload,
        },
        Op::Read => Frame::Read {
            token: h.token,
            offset: h.offset,
            len: h.len,
        },
        Op::Control => Frame::Control { bytes: payload },
        Op::WriteAck => Frame::WriteAck {
            token: h.token,
            status: h.status,
        },
        Op::ReadResp => Frame::ReadResp {
            token: h.token,
            status: h.status,
            data: payload,
        },
    }
}

impl Frame<'_> {
    /// A short description for logs (never the payload).
    pub fn describe(&self) -> String {
        match *self {
            Frame::Write {
                token,
                offset,
                data,
            } => {
                format!("WRITE token={token} offset={offset} len={}", data.len())
            }
            Frame::Read { token, offset, len } => {
                format!("READ token={token} offset={offset} len={len}")
            }
            Frame::Control { bytes } => format!("CONTROL len={}", bytes.len()),
            Frame::WriteAck { token, status } => format!("WRITE_ACK token={token} {status:?}"),
            Frame::ReadResp {
                token,
                status,
                data,
            } => {
                format!("READ_RESP token={token} {status:?} len={}", data.len())
            }
        }
    }
}

fn put_header(out: &mut Vec<u8>, op: Op, status: Status, len: u32, token: u64, offset: u64) {
    out.push(op as u8);
    out.push(status as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&token.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
}

fn len32(len: usize) -> Result<u32, CodecError> {
    u32::try_from(len).map_err(|_| CodecError::Unencodable { len })
}

/// Appends `frame` to `out`. A READ_RESP with a non-OK status carries no data (any given is
/// dropped), as the decoder requires.
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    match *frame {
        Frame::Write {
            token,
            offset,
            data,
        } => {
            put_header(
                out,
                Op::Write,
                Status::Ok,
                len32(data.len())?,
                token,
                offset,
            );
            out.extend_from_slice(data);
        }
        Frame::Read { token, offset, len } => {
            put_header(out, Op::Read, Status::Ok, len, token, offset)
        }
        Frame::Control { bytes } => {
            put_header(out, Op::Control, Status::Ok, len32(bytes.len())?, 0, 0);
            out.extend_from_slice(bytes);
        }
        Frame::WriteAck { token, status } => put_header(out, Op::WriteAck, status, 0, token, 0),
        Frame::ReadResp {
            token,
            status,
            data,
        } => {
            let data = if status == Status::Ok { data } else { &[] };
            put_header(out, Op::ReadResp, status, len32(data.len())?, token, 0);
            out.extend_from_slice(data);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_data: 1 << 16,
        max_control: 1 << 12,
    };

    #[test]
    fn round_trips() {
        let frames = [
            Frame::Write {
                token: 7,
                offset: 4096,
                data: b"hello",
            },
            Frame::Read {
                token: 8,
                offset: 128,
                len: 8,
            },
            Frame::Control { bytes: b"prep" },
            Frame::WriteAck {
                token: 9,
                status: Status::PermissionDenied,
            },
            Frame::ReadResp {
                token: 10,
                status: Status::Ok,
                data: b"abcdefgh",
            },
        ];
        let mut buf = Vec::new();
        for f in &frames {
            encode(f, &mut buf).unwrap();
        }
        let mut at = 0;
        for f in &frames {
            let (d, used) = decode(&buf[at..], &L).unwrap();
            assert_eq!(&d, f);
            at += used;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn refuses_bad_headers() {
        let mut buf = Vec::new();
        encode(&Frame::Control { bytes: &[0; 5000] }, &mut buf).unwrap();
        assert!(matches!(
            decode(&buf, &L),
            Err(CodecError::TooLong {
                op: Op::Control,
                ..
            })
        ));
        let mut b = [0u8; HEADER_LEN];
        b[0] = 9;
        assert_eq!(decode(&b, &L), Err(CodecError::UnknownOp(9)));
        b[0] = Op::Write as u8;
        b[1] = 1;
        assert!(matches!(
            decode(&b, &L),
            Err(CodecError::NonZero {
                field: "status",
                ..
            })
        ));
        assert_eq!(
            decode(&b[..10], &L),
            Err(CodecError::Incomplete { need: HEADER_LEN })
        );
    }
}
