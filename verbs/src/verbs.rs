//! A small safe layer over libibverbs (`rdma-sys`).
//!
//! Ownership makes use-after-free impossible from safe code: every object holds an `Arc` of
//! what it was created from (MR → PD → context, QP → PD + CQs), a memory registration holds
//! the memory it covers (an `Arc<Region>` or an owned buffer), and a QP only posts work
//! requests that name memory registrations it holds (see [`Qp::hold`]), so registered
//! memory outlives every request the NIC may still be executing.

use crate::error::{VerbsError, NO_DEVICE_HINT};
use crate::wr::{RecvList, SendList};
use ballot::region::Region;
use rdma_sys::*;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Access rights of a memory registration or (remote part only) of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub local_write: bool,
    pub remote_write: bool,
    pub remote_read: bool,
}

impl Access {
    pub const LOCAL: Access = Access {
        local_write: true,
        remote_write: false,
        remote_read: false,
    };
    pub const REMOTE_READ: Access = Access {
        local_write: false,
        remote_write: false,
        remote_read: true,
    };
    pub const REMOTE_RW: Access = Access {
        local_write: true,
        remote_write: true,
        remote_read: true,
    };
    /// The `IBV_ACCESS_*` bits. Remote write requires local write (verbs rule), so it is
    /// implied here for memory registrations.
    pub fn mr_bits(self) -> u32 {
        let mut b = 0;
        if self.local_write || self.remote_write {
            b |= ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        }
        if self.remote_write {
            b |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if self.remote_read {
            b |= ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        b
    }
    /// The `qp_access_flags` of a QP: which remote operations its peer may perform.
    pub fn qp_bits(self) -> u32 {
        let mut b = 0;
        if self.remote_write {
            b |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if self.remote_read {
            b |= ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        b
    }
}

/// Names of the RDMA devices present. `NoDevice` when there are none or when the kernel has
/// no RDMA support at all (`ibv_get_device_list` fails with ENOSYS).
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    let mut n: i32 = 0;
    // SAFETY: plain FFI call; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let err = std::io::Error::last_os_error();
        return Err(VerbsError::NoDevice(match err.raw_os_error() {
            Some(libc::ENOSYS) => format!(
                "this kernel has no RDMA support (ibv_get_device_list: {err}); {NO_DEVICE_HINT}"
            ),
            _ => format!("ibv_get_device_list failed: {err}; {NO_DEVICE_HINT}"),
        }));
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds n valid device pointers.
        unsafe {
            let d = *list.add(i);
            names.push(
                CStr::from_ptr(ibv_get_device_name(d))
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    // SAFETY: list came from ibv_get_device_list.
    unsafe { ibv_free_device_list(list) };
    if names.is_empty() {
        return Err(VerbsError::NoDevice(format!(
            "no RDMA device found; {NO_DEVICE_HINT}"
        )));
    }
    Ok(names)
}

/// An open device.
pub struct Context {
    ctx: *mut ibv_context,
    name: String,
}
// SAFETY: the pointer is owned (closed once, in Drop) and an ibv_context is not tied to the
// thread that opened it.
unsafe impl Send for Context {}
// SAFETY: shared use only passes the context to libibverbs calls, which are thread safe
// (the library and providers lock internally); no Rust code reads or writes through it.
unsafe impl Sync for Context {}

/// What a port reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    pub active: bool,
    /// `IBV_MTU_*` enum value (1 = 256 ... 5 = 4096).
    pub active_mtu: u32,
    pub gid_table_len: i32,
    pub ethernet: bool,
}

/// Bytes of an `IBV_MTU_*` value.
pub fn mtu_bytes(mtu: u32) -> usize {
    128 << mtu.min(5)
}

impl Context {
    /// Opens `name`, or the first device when `None`.
    pub fn open(name: Option<&str>) -> Result<Arc<Context>, VerbsError> {
        let names = device_names()?;
        let want = match name {
            Some(n) => names.iter().position(|d| d == n).ok_or_else(|| {
                VerbsError::NoDevice(format!(
                    "device {n} not found (present: {}); {NO_DEVICE_HINT}",
                    names.join(", ")
                ))
            })?,
            None => 0,
        };
        let mut n = 0;
        // SAFETY: list is valid until freed; the index is within n (the device set could
        // change between the two calls, so it is checked again).
        unsafe {
            let list = ibv_get_device_list(&mut n);
            if list.is_null() || want >= n as usize {
                if !list.is_null() {
                    ibv_free_device_list(list);
                }
                return Err(VerbsError::NoDevice(format!(
                    "device list changed while opening; {NO_DEVICE_HINT}"
                )));
            }
            let ctx = ibv_open_device(*list.add(want));
            let err = VerbsError::last(format!("ibv_open_device({})", names[want]));
            ibv_free_device_list(list);
            if ctx.is_null() {
                return Err(err);
            }
            Ok(Arc::new(Context {
                ctx,
                name: names[want].clone(),
            }))
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn query_port(&self, port: u8) -> Result<PortInfo, VerbsError> {
        let mut a = MaybeUninit::<ibv_port_attr>::zeroed();
        // SAFETY: valid context, out pointer to a zeroed struct.
        let r = unsafe { ___ibv_query_port(self.ctx, port, a.as_mut_ptr()) };
        if r != 0 {
            return Err(VerbsError::ret(
                format!("ibv_query_port({}, port {port})", self.name),
                r,
            ));
        }
        // SAFETY: initialised by the call (and zeroed before).
        let a = unsafe { a.assume_init() };
        Ok(PortInfo {
            active: a.state == ibv_port_state::IBV_PORT_ACTIVE,
            active_mtu: a.active_mtu,
            gid_table_len: a.gid_tbl_len,
            ethernet: a.link_layer == 1,
        })
    }

    pub fn query_gid(&self, port: u8, index: u32) -> Result<[u8; 16], VerbsError> {
        let mut g = MaybeUninit::<ibv_gid>::zeroed();
        // SAFETY: valid context, out pointer.
        let r = unsafe { ibv_query_gid(self.ctx, port, index as i32, g.as_mut_ptr()) };
        if r != 0 {
            return Err(VerbsError::ret(
                format!("ibv_query_gid({}, port {port}, index {index})", self.name),
                r,
            ));
        }
        // SAFETY: initialised; every bit pattern is a valid [u8; 16].
        Ok(unsafe { g.assume_init().raw })
    }

    /// The first IPv4-mapped GID (`::ffff:a.b.c.d`, RoCE v2 over IPv4) on `port`.
    pub fn find_ipv4_gid(&self, port: u8) -> Result<u32, VerbsError> {
        let len = self.query_port(port)?.gid_table_len.max(0) as u32;
        for i in 0..len {
            if let Ok(g) = self.query_gid(port, i) {
                if is_ipv4_mapped(&g) {
                    return Ok(i);
                }
            }
        }
        Err(VerbsError::Invalid(format!(
            "{} port {port} has no IPv4-mapped GID (give --gid-index, or add an IPv4 \
             address to the netdev under the rxe device)",
            self.name
        )))
    }
}

pub fn is_ipv4_mapped(g: &[u8; 16]) -> bool {
    g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child holds an Arc<Context>, so none is alive any more.
        unsafe { ibv_close_device(self.ctx) };
    }
}

/// A protection domain. QPs only reach memory registered in their own PD.
pub struct Pd {
    pd: *mut ibv_pd,
    ctx: Arc<Context>,
}
// SAFETY: the pointer is owned (deallocated once, in Drop, after every MR and QP holding an
// Arc<Pd> is gone) and a protection domain is not tied to a thread.
unsafe impl Send for Pd {}
// SAFETY: shared use only passes the PD to ibv_reg_mr / ibv_create_qp, which are thread
// safe; no Rust code reads or writes through the pointer.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>, VerbsError> {
        // SAFETY: `ctx.ctx` is open until the Context drops, which `ctx` (an Arc) prevents.
        let pd = unsafe { ibv_alloc_pd(ctx.ctx) };
        if pd.is_null() {
            return Err(VerbsError::last(format!("ibv_alloc_pd({})", ctx.name)));
        }
        Ok(Arc::new(Pd {
            pd,
            ctx: ctx.clone(),
        }))
    }
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}
impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc<Pd>: none is alive.
        unsafe { ibv_dealloc_pd(self.pd) };
    }
}

/// Page-aligned, zeroed memory owned by a memory registration.
struct OwnedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}
impl Drop for OwnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

enum Backing {
    Region(#[allow(dead_code)] Arc<Region>),
    Owned(#[allow(dead_code)] OwnedBuf),
}

/// A memory registration over memory it keeps alive.
pub struct Mr {
    mr: *mut ibv_mr,
    addr: *mut u8,
    len: usize,
    access: Access,
    _pd: Arc<Pd>,
    _backing: Backing,
}
// SAFETY: the registration and the memory it covers are owned (the backing lives in the Mr,
// deregistered once in Drop) and not tied to a thread.
unsafe impl Send for Mr {}
// SAFETY: through `&Mr` the registered memory is only accessed by bounds-checked raw copies
// (NIC semantics, as in Region: the NIC may write it concurrently, readers validate), and
// the ibv_mr is only read for its immutable lkey/rkey.
unsafe impl Sync for Mr {}

impl Mr {
    fn reg(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        access: Access,
        backing: Backing,
        what: &str,
    ) -> Result<Arc<Mr>, VerbsError> {
        if len == 0 {
            return Err(VerbsError::Invalid(format!(
                "{what}: zero-length registration"
            )));
        }
        // SAFETY: addr..addr+len is memory kept alive by `backing` for the MR's lifetime.
        let mr = unsafe { ibv_reg_mr(pd.pd, addr.cast(), len, access.mr_bits() as i32) };
        if mr.is_null() {
            let mut e = VerbsError::last(format!(
                "ibv_reg_mr({what}, {len} bytes, access {access:?})"
            ));
            if e.errno() == Some(libc::ENOMEM) || e.errno() == Some(libc::EPERM) {
                if let VerbsError::Call { what, .. } = &mut e {
                    what.push_str(" [memlock limit? see `ulimit -l` in docs/rdma.md]");
                }
            }
            return Err(e);
        }
        Ok(Arc::new(Mr {
            mr,
            addr,
            len,
            access,
            _pd: pd.clone(),
            _backing: backing,
        }))
    }

    /// Registers `len` bytes at `offset` of `region` (an existing mapping).
    pub fn register_region(
        pd: &Arc<Pd>,
        region: &Arc<Region>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<Arc<Mr>, VerbsError> {
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => {}
            _ => {
                return Err(VerbsError::Invalid(format!(
                    "registration {offset}+{len} outside region of {} bytes",
                    region.len()
                )))
            }
        }
        // SAFETY: in bounds (checked above).
        let addr = unsafe { region.as_ptr().add(offset) };
        Self::reg(
            pd,
            addr,
            len,
            access,
            Backing::Region(region.clone()),
            &format!("region+{offset}"),
        )
    }

    /// Allocates `len` zeroed, page-aligned bytes and registers them.
    pub fn alloc(pd: &Arc<Pd>, len: usize, access: Access) -> Result<Arc<Mr>, VerbsError> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
            .map_err(|e| VerbsError::Invalid(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size (`len.max(1)`); a null return is checked.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(VerbsError::Invalid(format!(
                "out of memory for {len} bytes"
            )));
        }
        let b = OwnedBuf { ptr, layout };
        Self::reg(pd, ptr, len, access, Backing::Owned(b), "buffer")
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: `self.mr` came from a successful ibv_reg_mr and stays registered until Drop.
        unsafe { (*self.mr).lkey }
    }
    pub fn rkey(&self) -> u32 {
        // SAFETY: `self.mr` came from a successful ibv_reg_mr and stays registered until Drop.
        unsafe { (*self.mr).rkey }
    }
    /// Address of the first registered byte (what a peer names in remote operations).
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn access(&self) -> Access {
        self.access
    }
    pub(crate) fn check(&self, offset: usize, len: usize) -> Result<(), VerbsError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(VerbsError::Invalid(format!(
                "range {offset}+{len} outside registration of {} bytes",
                self.len
            ))),
        }
    }
    /// Copies `data` into the registered memory at `offset`.
    pub fn copy_in(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked; memory alive; concurrent NIC access has Region semantics.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(offset), data.len()) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        Ok(())
    }
    /// Copies registered memory at `offset` into `out`.
    pub fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.check(offset, out.len())?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: as in copy_in.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr.add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: QPs that may use this MR hold an Arc to it, so no request is outstanding.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// One work completion, copied out of the CQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub byte_len: u32,
    pub imm: Option<u32>,
    pub qp_num: u32,
    pub vendor_err: u32,
}
impl WorkCompletion {
    pub fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }
}

/// A completion queue.
pub struct Cq {
    cq: *mut ibv_cq,
    depth: usize,
    _ctx: Arc<Context>,
}
// SAFETY: the pointer is owned (destroyed once, in Drop, after every QP holding an
// Arc<Cq>) and a CQ is not tied to a thread.
unsafe impl Send for Cq {}
// SAFETY: shared use is ibv_poll_cq (and passing the CQ to ibv_create_qp); libibverbs
// providers lock the CQ internally, so concurrent polls are safe (each completion is
// returned once).
unsafe impl Sync for Cq {}

const POLL_BATCH: usize = 32;

impl Cq {
    pub fn new(ctx: &Arc<Context>, depth: usize) -> Result<Arc<Cq>, VerbsError> {
        // SAFETY: `ctx.ctx` is open (the Arc keeps the Context alive); no completion channel
        // and no context pointer are passed.
        let cq = unsafe {
            ibv_create_cq(
                ctx.ctx,
                depth as i32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(VerbsError::last(format!("ibv_create_cq(depth {depth})")));
        }
        Ok(Arc::new(Cq {
            cq,
            depth,
            _ctx: ctx.clone(),
        }))
    }
    pub fn depth(&self) -> usize {
        self.depth
    }
    /// Polls up to `out.len()` completions without blocking or allocating.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize, VerbsError> {
        let mut wc: [MaybeUninit<ibv_wc>; POLL_BATCH] =
            [const { MaybeUninit::uninit() }; POLL_BATCH];
        let want = out.len().min(POLL_BATCH);
        // SAFETY: valid CQ; the array has room for `want` entries.
        let n = unsafe { ibv_poll_cq(self.cq, want as i32, wc.as_mut_ptr().cast()) };
        if n < 0 {
            return Err(VerbsError::ret("ibv_poll_cq", n));
        }
        for i in 0..n as usize {
            // SAFETY: the first n entries were written by ibv_poll_cq.
            let w = unsafe { wc[i].assume_init_ref() };
            let with_imm = w.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out[i] = WorkCompletion {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                byte_len: w.byte_len,
                // SAFETY: the union holds imm_data when WITH_IMM is set.
                imm: with_imm
                    .then(|| u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data })),
                qp_num: w.qp_num,
                vendor_err: w.vendor_err,
            };
        }
        Ok(n as usize)
    }
}
impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs using this CQ hold an Arc to it.
        unsafe { ibv_destroy_cq(self.cq) };
    }
}

/// Everything a peer needs to connect its RC QP to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
}

/// Path parameters. Defaults are generous: rxe under QEMU TCG retransmits.
#[derive(Debug, Clone, Copy)]
pub struct PathConfig {
    pub port: u8,
    pub gid_index: u32,
    /// `IBV_MTU_*` value; `None`: the port's active MTU.
    pub mtu: Option<u32>,
    /// Local ACK timeout exponent: 4.096 us * 2^timeout.
    pub timeout: u8,
    pub retry_cnt: u8,
    /// 7 = retry forever on receiver-not-ready.
    pub rnr_retry: u8,
    pub min_rnr_timer: u8,
    pub max_rd_atomic: u8,
}
impl Default for PathConfig {
    fn default() -> Self {
        Self {
            port: 1,
            gid_index: 1,
            mtu: None,
            timeout: 17, // ~0.5 s
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            max_rd_atomic: 16,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_sge: u32,
}

/// An RC queue pair.
pub struct Qp {
    qp: *mut ibv_qp,
    pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
    held: Vec<Arc<Mr>>,
    caps: QpCaps,
    access: Access,
}
// SAFETY: the QP pointer is owned (destroyed once, in Drop) and not tied to a thread; the
// MRs, CQs and PD it uses are held in Arcs (themselves Send + Sync). Qp is deliberately not
// Sync: posting and state changes take `&mut self`.
unsafe impl Send for Qp {}

impl Qp {
    pub fn create_rc(
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        caps: QpCaps,
    ) -> Result<Qp, VerbsError> {
        // SAFETY: ibv_qp_init_attr is a plain C struct: all-zero bytes are a valid value (null
        // pointers, zero counts); the fields that matter are set below.
        let mut a: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        a.send_cq = send_cq.cq;
        a.recv_cq = recv_cq.cq;
        a.cap.max_send_wr = caps.max_send_wr;
        a.cap.max_recv_wr = caps.max_recv_wr;
        a.cap.max_send_sge = caps.max_sge;
        a.cap.max_recv_sge = caps.max_sge;
        a.qp_type = ibv_qp_type::IBV_QPT_RC;
        a.sq_sig_all = 0;
        // SAFETY: valid PD and CQs (kept alive by the Arcs stored below).
        let qp = unsafe { ibv_create_qp(pd.pd, &mut a) };
        if qp.is_null() {
            return Err(VerbsError::last(format!("ibv_create_qp(RC, {caps:?})")));
        }
        Ok(Qp {
            qp,
            pd: pd.clone(),
            _send_cq: send_cq.clone(),
            _recv_cq: recv_cq.clone(),
            held: Vec::new(),
            caps,
            access: Access::default(),
        })
    }

    pub fn num(&self) -> u32 {
        // SAFETY: `self.qp` came from a successful ibv_create_qp and lives until Drop.
        unsafe { (*self.qp).qp_num }
    }
    pub fn caps(&self) -> QpCaps {
        self.caps
    }
    pub fn access(&self) -> Access {
        self.access
    }

    /// Keeps `mr` alive as long as this QP; only held MRs may appear in posted requests.
    pub fn hold(&mut self, mr: &Arc<Mr>) -> Result<(), VerbsError> {
        if !Arc::ptr_eq(&mr._pd, &self.pd) {
            return Err(VerbsError::Invalid(
                "memory registration belongs to another protection domain".into(),
            ));
        }
        if !self.held.iter().any(|m| Arc::ptr_eq(m, mr)) {
            self.held.push(mr.clone());
        }
        Ok(())
    }
    pub(crate) fn holds(&self, mr: *const Mr) -> bool {
        self.held.iter().any(|m| std::ptr::eq(Arc::as_ptr(m), mr))
    }

    fn modify(&mut self, attr: &mut ibv_qp_attr, mask: u32, what: &str) -> Result<(), VerbsError> {
        // SAFETY: `self.qp` is live until Drop; `attr` is a valid struct for the call and
        // `mask` names only the fields its callers set.
        let r = unsafe { ibv_modify_qp(self.qp, attr, mask as i32) };
        if r != 0 {
            return Err(VerbsError::ret(
                format!("ibv_modify_qp({what}) on QP {}", self.num()),
                r,
            ));
        }
        Ok(())
    }

    /// RESET → INIT, granting the peer `access` to memory reachable through this QP.
    pub fn to_init(&mut self, port: u8, access: Access) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is a plain C struct (integers, arrays, nullable pointers): all-zero
        // bytes are a valid value; the fields that matter are set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = access.qp_bits();
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_PKEY_INDEX.0
            | m::IBV_QP_PORT.0
            | m::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut a, mask, "RESET->INIT")?;
        self.access = access;
        Ok(())
    }

    /// INIT → RTR towards `remote` (RoCE v2: a global route to the peer's GID).
    pub fn to_rtr(
        &mut self,
        remote: &Endpoint,
        path: &PathConfig,
        mtu: u32,
    ) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is a plain C struct (integers, arrays, nullable pointers): all-zero
        // bytes are a valid value; the fields that matter are set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = mtu;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = path.max_rd_atomic;
        a.min_rnr_timer = path.min_rnr_timer;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = path.gid_index as u8;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.port_num = path.port;
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_AV.0
            | m::IBV_QP_PATH_MTU.0
            | m::IBV_QP_DEST_QPN.0
            | m::IBV_QP_RQ_PSN.0
            | m::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | m::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut a, mask, "INIT->RTR")
    }

    /// RTR → RTS.
    pub fn to_rts(&mut self, psn: u32, path: &PathConfig) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is a plain C struct (integers, arrays, nullable pointers): all-zero
        // bytes are a valid value; the fields that matter are set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = psn;
        a.timeout = path.timeout;
        a.retry_cnt = path.retry_cnt;
        a.rnr_retry = path.rnr_retry;
        a.max_rd_atomic = path.max_rd_atomic;
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_SQ_PSN.0
            | m::IBV_QP_TIMEOUT.0
            | m::IBV_QP_RETRY_CNT.0
            | m::IBV_QP_RNR_RETRY.0
            | m::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut a, mask, "RTR->RTS")
    }

    /// RESET → INIT → RTR → RTS in one go.
    pub fn connect(
        &mut self,
        local_psn: u32,
        remote: &Endpoint,
        access: Access,
        path: &PathConfig,
        mtu: u32,
    ) -> Result<(), VerbsError> {
        self.to_init(path.port, access)?;
        self.to_rtr(remote, path, mtu)?;
        self.to_rts(local_psn, path)
    }

    /// Changes what the peer may do through this QP while it is connected (RTS → RTS).
    pub fn set_access(&mut self, access: Access) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is a plain C struct (integers, arrays, nullable pointers): all-zero
        // bytes are a valid value; the fields that matter are set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.cur_qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.qp_access_flags = access.qp_bits();
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE.0 | m::IBV_QP_CUR_STATE.0 | m::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut a, mask, &format!("RTS->RTS access {access:?}"))?;
        self.access = access;
        Ok(())
    }

    /// Moves the QP to RESET: outstanding requests are discarded, the peer's next
    /// operation fails. Bring it back with [`Qp::connect`].
    pub fn reset(&mut self) -> Result<(), VerbsError> {
        // SAFETY: ibv_qp_attr is a plain C struct (integers, arrays, nullable pointers): all-zero
        // bytes are a valid value; the fields that matter are set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RESET;
        self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_STATE.0, "->RESET")?;
        self.access = Access::default();
        Ok(())
    }

    /// The QP's current state (`IBV_QPS_*`).
    pub fn state(&self) -> Result<u32, VerbsError> {
        // SAFETY: ibv_qp_attr is a plain C struct (integers, arrays, nullable pointers):
        // all-zero bytes are a valid value. Same for ibv_qp_init_attr below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut i: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `self.qp` is live until Drop; `a` and `i` are valid out structs.
        let r = unsafe {
            ibv_query_qp(
                self.qp,
                &mut a,
                ibv_qp_attr_mask::IBV_QP_STATE.0 as i32,
                &mut i,
            )
        };
        if r != 0 {
            return Err(VerbsError::ret(format!("ibv_query_qp({})", self.num()), r));
        }
        Ok(a.qp_state)
    }

    /// Posts every request in `list` with one doorbell, then clears the list.
    pub fn post_send(&mut self, list: &mut SendList) -> Result<(), VerbsError> {
        if list.is_empty() {
            return Ok(());
        }
        for &mr in list.mrs() {
            if !self.holds(mr) {
                list.clear();
                return Err(VerbsError::Invalid(
                    "send request names a memory registration this QP does not hold".into(),
                ));
            }
        }
        let head = list.link();
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the chain points into `list`, alive for the call; local memory is held.
        let r = unsafe { ibv_post_send(self.qp, head, &mut bad) };
        let n = list.len();
        list.clear();
        if r != 0 {
            return Err(VerbsError::ret(
                format!("ibv_post_send({n} requests) on QP {}", self.num()),
                r,
            ));
        }
        Ok(())
    }

    /// Posts every receive in `list` with one call, then clears the list.
    pub fn post_recv(&mut self, list: &mut RecvList) -> Result<(), VerbsError> {
        if list.is_empty() {
            return Ok(());
        }
        for &mr in list.mrs() {
            if !self.holds(mr) {
                list.clear();
                return Err(VerbsError::Invalid(
                    "receive names a memory registration this QP does not hold".into(),
                ));
            }
        }
        let head = list.link();
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: as in post_send.
        let r = unsafe { ibv_post_recv(self.qp, head, &mut bad) };
        let n = list.len();
        list.clear();
        if r != 0 {
            return Err(VerbsError::ret(
                format!("ibv_post_recv({n} receives) on QP {}", self.num()),
                r,
            ));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: the QP is destroyed before the MRs, CQs and PD it holds.
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flag_mapping() {
        assert_eq!(Access::LOCAL.mr_bits(), 1);
        assert_eq!(Access::REMOTE_READ.mr_bits(), 4);
        assert_eq!(Access::REMOTE_RW.mr_bits(), 1 | 2 | 4);
        // remote write implies local write on an MR, never on a QP.
        let w = Access {
            remote_write: true,
            ..Access::default()
        };
        assert_eq!(w.mr_bits(), 1 | 2);
        assert_eq!(w.qp_bits(), 2);
        assert_eq!(Access::REMOTE_RW.qp_bits(), 2 | 4);
        assert_eq!(Access::LOCAL.qp_bits(), 0);
    }

    #[test]
    fn mtu_and_gid_helpers() {
        assert_eq!(mtu_bytes(ibv_mtu::IBV_MTU_1024), 1024);
        assert_eq!(mtu_bytes(ibv_mtu::IBV_MTU_4096), 4096);
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert!(is_ipv4_mapped(&g));
        g[0] = 0xfe;
        assert!(!is_ipv4_mapped(&g));
    }

    /// On a machine without RDMA (this host kernel: ENOSYS) opening fails with a clear
    /// NoDevice; with a device it must open. Never a panic.
    #[test]
    fn open_without_device_is_a_clear_error() {
        match Context::open(None) {
            Ok(ctx) => assert!(!ctx.name().is_empty()),
            Err(VerbsError::NoDevice(s)) => assert!(s.contains("setup-rxe.sh"), "{s}"),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
        match Context::open(Some("no-such-device")) {
            Err(VerbsError::NoDevice(_)) => {}
            other => panic!(
                "expected NoDevice, got {:?}",
                other.map(|c| c.name().to_string())
            ),
        }
    }
}
