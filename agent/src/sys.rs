//! The few bpf(2) commands aya 0.16 does not expose for pinned links: opening a pin as a raw fd,
//! replacing a link's program in place (BPF_LINK_UPDATE, atomic for the attach point), and
//! reading which cgroup a link is attached to; and statfs(2), which tells a bpffs or a cgroup2
//! directory from a tmpfs.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Large enough for any `union bpf_attr` variant used here; zeroed as the kernel requires.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr of sufficient size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn put_u32(attr: &mut Attr, offset: usize, value: u32) {
    attr.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut Attr, offset: usize, value: u64) {
    attr.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

/// Opens a pinned bpffs object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = Attr([0; 128]);
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    put_u64(&mut attr, 0, cpath.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of a link in place; connections see either the old or the new program,
/// never none.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, program.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// What the kernel says about a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub program_id: u32,
    /// 0 once the cgroup is gone (the link is then defunct).
    pub cgroup_id: u64,
}

pub fn cgroup_link_info(link: impl AsFd) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; union { struct { __u64
    // cgroup_id; __u32 attach_type; } cgroup; ... } } — the union starts at offset 16.
    let mut info = [0u64; 32];
    let mut attr = Attr([0; 128]);
    // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    put_u32(&mut attr, 0, link.as_fd().as_raw_fd() as u32);
    put_u32(&mut attr, 4, std::mem::size_of_val(&info) as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0] as u32;
    if link_type != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a cgroup link (type {link_type})"),
        ));
    }
    Ok(CgroupLinkInfo {
        link_id: (info[0] >> 32) as u32,
        program_id: info[1] as u32,
        cgroup_id: info[2],
    })
}

/// The filesystem type (statfs(2) `f_type`) of `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into a zeroed struct we own; cpath is NUL-terminated.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(cpath.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type)
}
