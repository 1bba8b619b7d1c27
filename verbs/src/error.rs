//! Errors of the verbs layer, and how they map onto [`FabricError`].

use ballot::fabric::FabricError;
use ballot::NodeId;
use rdma_sys::ibv_wc_status as st;

/// Where to look when there is no device.
pub const NO_DEVICE_HINT: &str = "see scripts/setup-rxe.sh (Soft-RoCE on a Linux host with \
rdma_rxe) or scripts/rxe-vm.sh (a QEMU guest with Soft-RoCE when the host kernel has no RDMA)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerbsError {
    /// No RDMA device, or no RDMA support in this kernel.
    NoDevice(String),
    /// A verbs call failed: what was being done, and the errno it left.
    Call { what: String, errno: i32 },
    /// Bad input from the caller (out of bounds, list full, unknown MR...).
    Invalid(String),
}

impl VerbsError {
    /// A failed call; reads `errno` now, so call it right after the failing function.
    pub fn last(what: impl Into<String>) -> Self {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        Self::Call {
            what: what.into(),
            errno,
        }
    }
    /// A failed call that returned its error number (ibv_post_send, ibv_modify_qp...).
    pub fn ret(what: impl Into<String>, ret: i32) -> Self {
        // Some providers return -1 and set errno, others return the errno itself.
        let errno = if ret < 0 {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(-ret)
        } else {
            ret
        };
        Self::Call {
            what: what.into(),
            errno,
        }
    }
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl std::fmt::Display for VerbsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDevice(s) => write!(f, "no RDMA device: {s}"),
            Self::Call { what, errno } => write!(
                f,
                "{what}: {} (errno {errno})",
                std::io::Error::from_raw_os_error(*errno)
            ),
            Self::Invalid(s) => write!(f, "invalid verbs request: {s}"),
        }
    }
}
impl std::error::Error for VerbsError {}

impl From<VerbsError> for FabricError {
    fn from(e: VerbsError) -> Self {
        match e {
            VerbsError::NoDevice(s) => FabricError::NoDevice(s),
            e => {
                let kind = match &e {
                    VerbsError::Call { errno, .. } => {
                        std::io::Error::from_raw_os_error(*errno).kind()
                    }
                    _ => std::io::ErrorKind::InvalidInput,
                };
                FabricError::io(std::io::Error::new(kind, e))
            }
        }
    }
}

/// A work-completion status as text (`ibv_wc_status_str` without the FFI call).
pub fn wc_status_name(status: u32) -> &'static str {
    match status {
        st::IBV_WC_SUCCESS => "success",
        st::IBV_WC_LOC_LEN_ERR => "local length error",
        st::IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        st::IBV_WC_LOC_PROT_ERR => "local protection error",
        st::IBV_WC_WR_FLUSH_ERR => "work request flushed",
        st::IBV_WC_BAD_RESP_ERR => "bad response",
        st::IBV_WC_LOC_ACCESS_ERR => "local access error",
        st::IBV_WC_REM_INV_REQ_ERR => "remote invalid request",
        st::IBV_WC_REM_ACCESS_ERR => "remote access error",
        st::IBV_WC_REM_OP_ERR => "remote operation error",
        st::IBV_WC_RETRY_EXC_ERR => "transport retry counter exceeded",
        st::IBV_WC_RNR_RETRY_EXC_ERR => "RNR retry counter exceeded",
        st::IBV_WC_REM_ABORT_ERR => "remote aborted",
        st::IBV_WC_FATAL_ERR => "fatal error",
        st::IBV_WC_RESP_TIMEOUT_ERR => "response timeout",
        st::IBV_WC_GENERAL_ERR => "general error",
        _ => "unknown status",
    }
}

/// Maps the status of a failed one-sided operation on `peer`'s region to a fabric error.
///
/// A write the peer refuses because its QP no longer grants remote write is a fence:
/// hardware reports `REM_ACCESS_ERR`; rxe reports the same check as an invalid request
/// (`REM_INV_REQ_ERR`, "operation not allowed on this QP"), so both mean `PermissionDenied`
/// for a write. Transport failures and flushed requests mean the connection is gone.
pub fn wc_to_fabric(status: u32, is_write: bool, peer: NodeId) -> FabricError {
    match status {
        st::IBV_WC_REM_ACCESS_ERR if is_write => FabricError::PermissionDenied(peer),
        st::IBV_WC_REM_INV_REQ_ERR if is_write => FabricError::PermissionDenied(peer),
        st::IBV_WC_REM_ACCESS_ERR | st::IBV_WC_REM_INV_REQ_ERR => FabricError::OutOfBounds(peer),
        st::IBV_WC_RETRY_EXC_ERR
        | st::IBV_WC_RNR_RETRY_EXC_ERR
        | st::IBV_WC_WR_FLUSH_ERR
        | st::IBV_WC_RESP_TIMEOUT_ERR
        | st::IBV_WC_REM_ABORT_ERR => FabricError::Disconnected(peer),
        s => FabricError::io(std::io::Error::other(format!(
            "peer {peer}: work completion failed: {} (status {s})",
            wc_status_name(s)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_errno_and_context() {
        let e = VerbsError::ret("ibv_modify_qp(INIT->RTR) qp 17", libc::EINVAL);
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let s = e.to_string();
        assert!(s.contains("INIT->RTR") && s.contains("errno 22"), "{s}");
        let f: FabricError = VerbsError::NoDevice("x".into()).into();
        assert_eq!(f, FabricError::NoDevice("x".into()));
        let f: FabricError = e.clone().into();
        assert!(matches!(&f, FabricError::Io(s) if s.to_string().contains("errno 22")));
        assert_eq!(f.to_string(), format!("I/O error: {e}"));
        let source = std::error::Error::source(&f).expect("the verbs error is the source");
        let io = source.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(io.get_ref().unwrap().downcast_ref::<VerbsError>(), Some(&e));
    }

    #[test]
    fn completion_status_mapping() {
        assert_eq!(
            wc_to_fabric(st::IBV_WC_REM_ACCESS_ERR, true, 2),
            FabricError::PermissionDenied(2)
        );
        assert_eq!(
            wc_to_fabric(st::IBV_WC_REM_INV_REQ_ERR, true, 2),
            FabricError::PermissionDenied(2)
        );
        assert_eq!(
            wc_to_fabric(st::IBV_WC_REM_ACCESS_ERR, false, 1),
            FabricError::OutOfBounds(1)
        );
        assert_eq!(
            wc_to_fabric(st::IBV_WC_RETRY_EXC_ERR, true, 1),
            FabricError::Disconnected(1)
        );
        assert_eq!(
            wc_to_fabric(st::IBV_WC_WR_FLUSH_ERR, false, 3),
            FabricError::Disconnected(3)
        );
        assert!(matches!(wc_to_fabric(st::IBV_WC_LOC_PROT_ERR, true, 0),
                         FabricError::Io(s) if s.to_string().contains("local protection")));
    }
}
