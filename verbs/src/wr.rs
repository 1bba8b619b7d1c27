//! Work-request lists: built without allocation (fixed capacity), posted with one doorbell.

use crate::error::VerbsError;
use crate::verbs::Mr;
use rdma_sys::*;

/// Remote memory: an address inside a peer's registration and its rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub addr: u64,
    pub rkey: u32,
}

/// Local memory of one request: already bounds-checked against its registration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Local {
    pub mr: *const Mr,
    pub addr: u64,
    pub lkey: u32,
    pub len: usize,
}

/// A list of send-queue requests (WRITE, WRITE_WITH_IMM, READ, SEND), one SGE each.
pub struct SendList {
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
    mrs: Vec<*const Mr>,
    cap: usize,
}
// SAFETY: the raw pointers are MR identities (compared, never dereferenced here), local
// addresses the NIC dereferences only while the posting QP holds those MRs, and
// `next`/`sg_list` links into the list's own heap vectors (rebuilt by `link` before every
// post, so they move with the list). Nothing is tied to the creating thread.
unsafe impl Send for SendList {}

impl SendList {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            wrs: Vec::with_capacity(cap),
            sges: Vec::with_capacity(cap),
            mrs: Vec::with_capacity(cap),
            cap,
        }
    }
    pub fn len(&self) -> usize {
        self.wrs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }
    pub fn is_full(&self) -> bool {
        self.wrs.len() == self.cap
    }
    pub fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
        self.mrs.clear();
    }
    pub(crate) fn mrs(&self) -> &[*const Mr] {
        &self.mrs
    }
    /// Makes the last request signaled (selective signaling: one completion per batch).
    pub fn signal_last(&mut self) {
        if let Some(w) = self.wrs.last_mut() {
            w.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
    }
    /// Sets the `next` and `sg_list` pointers (stable: the vectors never reallocate) and
    /// returns the head of the chain.
    pub(crate) fn link(&mut self) -> *mut ibv_send_wr {
        let n = self.wrs.len();
        let sges = self.sges.as_mut_ptr();
        let base = self.wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < n, within both vectors.
            unsafe {
                let w = &mut *base.add(i);
                w.sg_list = if w.num_sge > 0 {
                    sges.add(i)
                } else {
                    std::ptr::null_mut()
                };
                w.next = if i + 1 < n {
                    base.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        base
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        opcode: u32,
        wr_id: u64,
        local: &Mr,
        offset: usize,
        len: usize,
        remote: Option<Remote>,
        imm: Option<u32>,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        local.check(offset, len)?;
        let l = Local {
            mr: local as *const Mr,
            addr: local.addr() + offset as u64,
            lkey: local.lkey(),
            len,
        };
        self.push_raw(opcode, wr_id, l, remote, imm, signaled)
    }

    pub(crate) fn push_raw(
        &mut self,
        opcode: u32,
        wr_id: u64,
        local: Local,
        remote: Option<Remote>,
        imm: Option<u32>,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        if self.is_full() {
            return Err(VerbsError::Invalid(format!(
                "work-request list full ({} requests)",
                self.cap
            )));
        }
        let len = local.len;
        if len > u32::MAX as usize {
            return Err(VerbsError::Invalid(format!("request of {len} bytes")));
        }
        // SAFETY: POD; every field that matters is set below.
        let mut w: ibv_send_wr = unsafe { std::mem::zeroed() };
        w.wr_id = wr_id;
        w.opcode = opcode;
        w.num_sge = i32::from(len > 0);
        w.send_flags = if signaled {
            ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        if let Some(imm) = imm {
            w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        if let Some(r) = remote {
            w.wr.rdma = rdma_t {
                remote_addr: r.addr,
                rkey: r.rkey,
            };
        }
        self.sges.push(ibv_sge {
            addr: local.addr,
            length: len as u32,
            lkey: local.lkey,
        });
        self.wrs.push(w);
        self.mrs.push(local.mr);
        Ok(())
    }

    /// RDMA WRITE of `len` bytes at `offset` of `local` to `remote`.
    pub fn write(
        &mut self,
        wr_id: u64,
        local: &Mr,
        offset: usize,
        len: usize,
        remote: Remote,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        self.push(
            ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            wr_id,
            local,
            offset,
            len,
            Some(remote),
            None,
            signaled,
        )
    }
    /// RDMA WRITE with immediate data (consumes a receive at the peer).
    #[allow(clippy::too_many_arguments)]
    pub fn write_imm(
        &mut self,
        wr_id: u64,
        local: &Mr,
        offset: usize,
        len: usize,
        remote: Remote,
        imm: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        self.push(
            ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            wr_id,
            local,
            offset,
            len,
            Some(remote),
            Some(imm),
            signaled,
        )
    }
    /// RDMA READ of `len` bytes at `remote` into `local` at `offset`.
    pub fn read(
        &mut self,
        wr_id: u64,
        local: &Mr,
        offset: usize,
        len: usize,
        remote: Remote,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        if !local.access().local_write {
            return Err(VerbsError::Invalid(
                "READ target needs a locally writable registration".into(),
            ));
        }
        self.push(
            ibv_wr_opcode::IBV_WR_RDMA_READ,
            wr_id,
            local,
            offset,
            len,
            Some(remote),
            None,
            signaled,
        )
    }
    /// SEND of `len` bytes at `offset` of `local` (consumes a receive at the peer).
    pub fn send(
        &mut self,
        wr_id: u64,
        local: &Mr,
        offset: usize,
        len: usize,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        self.push(
            ibv_wr_opcode::IBV_WR_SEND,
            wr_id,
            local,
            offset,
            len,
            None,
            None,
            signaled,
        )
    }

    /// Opcode, wr_id, flags, SGE and remote of request `i` (for tests and debugging).
    pub fn describe(&self, i: usize) -> (u32, u64, u32, (u64, u32, u32), Remote) {
        let w = &self.wrs[i];
        let s = &self.sges[i];
        // SAFETY: rdma is the variant written by push (zeroed otherwise).
        let r = unsafe { w.wr.rdma };
        (
            w.opcode,
            w.wr_id,
            w.send_flags,
            (s.addr, s.length, s.lkey),
            Remote {
                addr: r.remote_addr,
                rkey: r.rkey,
            },
        )
    }
}

/// A list of receive requests, one SGE each.
pub struct RecvList {
    wrs: Vec<ibv_recv_wr>,
    sges: Vec<ibv_sge>,
    mrs: Vec<*const Mr>,
    cap: usize,
}
// SAFETY: as for SendList: the raw pointers (MR identities, and `next`/`sg_list` links into
// the list's own vectors, rebuilt by `link` before every post) are never dereferenced
// outside `&mut self` methods; moving the list to another thread moves the vectors too.
unsafe impl Send for RecvList {}

impl RecvList {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            wrs: Vec::with_capacity(cap),
            sges: Vec::with_capacity(cap),
            mrs: Vec::with_capacity(cap),
            cap,
        }
    }
    pub fn len(&self) -> usize {
        self.wrs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }
    pub fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
        self.mrs.clear();
    }
    pub(crate) fn mrs(&self) -> &[*const Mr] {
        &self.mrs
    }
    pub(crate) fn link(&mut self) -> *mut ibv_recv_wr {
        let n = self.wrs.len();
        let sges = self.sges.as_mut_ptr();
        let base = self.wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < n.
            unsafe {
                let w = &mut *base.add(i);
                w.sg_list = sges.add(i);
                w.next = if i + 1 < n {
                    base.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        base
    }
    /// A receive into `len` bytes at `offset` of `local`.
    pub fn recv(
        &mut self,
        wr_id: u64,
        local: &Mr,
        offset: usize,
        len: usize,
    ) -> Result<(), VerbsError> {
        if self.wrs.len() == self.cap {
            return Err(VerbsError::Invalid(format!(
                "receive list full ({})",
                self.cap
            )));
        }
        if !local.access().local_write {
            return Err(VerbsError::Invalid(
                "receive buffer needs a locally writable registration".into(),
            ));
        }
        local.check(offset, len)?;
        self.sges.push(ibv_sge {
            addr: local.addr() + offset as u64,
            length: len as u32,
            lkey: local.lkey(),
        });
        self.wrs.push(ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 1,
        });
        self.mrs.push(local as *const Mr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdma_sys::ibv_wr_opcode as op;

    fn local(addr: u64, len: usize) -> Local {
        Local {
            mr: 0x1000 as *const Mr,
            addr,
            lkey: 77,
            len,
        }
    }

    #[test]
    fn builds_a_doorbell_chain() {
        let mut l = SendList::with_capacity(3);
        let r = Remote {
            addr: 0xdead_0000,
            rkey: 9,
        };
        l.push_raw(
            op::IBV_WR_RDMA_WRITE,
            1,
            local(0x5000, 64),
            Some(r),
            None,
            false,
        )
        .unwrap();
        l.push_raw(
            op::IBV_WR_RDMA_WRITE_WITH_IMM,
            2,
            local(0x5040, 8),
            Some(r),
            Some(0x0102_0304),
            true,
        )
        .unwrap();
        l.push_raw(op::IBV_WR_SEND, 3, local(0x6000, 0), None, None, true)
            .unwrap();
        assert!(l.is_full());
        assert!(l
            .push_raw(op::IBV_WR_SEND, 4, local(0, 1), None, None, true)
            .is_err());
        let (opc, id, flags, sge, rem) = l.describe(0);
        assert_eq!(
            (opc, id, flags, sge, rem),
            (op::IBV_WR_RDMA_WRITE, 1, 0, (0x5000, 64, 77), r)
        );
        let (opc, _, flags, _, _) = l.describe(1);
        assert_eq!(opc, op::IBV_WR_RDMA_WRITE_WITH_IMM);
        assert_eq!(flags, ibv_send_flags::IBV_SEND_SIGNALED.0);
        // Immediate data travels in network byte order.
        assert_eq!(
            // SAFETY: a u32 union; push wrote imm_data for WRITE_WITH_IMM.
            unsafe { l.wrs[1].imm_data_invalidated_rkey_union.imm_data },
            0x0102_0304u32.to_be()
        );
        let head = l.link();
        // SAFETY: `link` chained the list's own requests (alive in `l`, not modified until
        // the end of this block); the third has no SGE, so only pointers set by `link` are
        // followed.
        unsafe {
            assert_eq!((*head).wr_id, 1);
            let second = (*head).next;
            assert_eq!((*second).wr_id, 2);
            assert_eq!((*(*second).sg_list).addr, 0x5040);
            let third = (*second).next;
            assert_eq!((*third).num_sge, 0, "zero-length SEND has no SGE");
            assert!((*third).sg_list.is_null());
            assert!((*third).next.is_null());
        }
        l.clear();
        assert!(l.is_empty());
    }

    #[test]
    fn oversized_requests_are_refused() {
        let mut l = SendList::with_capacity(1);
        let r = Remote { addr: 0, rkey: 0 };
        assert!(l
            .push_raw(
                op::IBV_WR_RDMA_WRITE,
                1,
                local(0, 1 << 33),
                Some(r),
                None,
                true
            )
            .is_err());
    }
}
