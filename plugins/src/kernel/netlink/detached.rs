//! Deleting a link without waiting for the kernel's reclaim of it.
//!
//! The kernel deletes a link in two parts, both inside the `RTM_DELLINK`
//! request's `sendto`: first it unregisters the device (the link leaves the
//! namespace's lists, its addresses, routes and neighbours go, its name is
//! free, and `RTM_DELLINK` is announced to the namespace's `RTNLGRP_LINK`
//! listeners), then, once the RTNL lock is released, it waits in
//! `netdev_run_todo` for an RCU barrier and for the device's last references
//! before it frees the memory. The second part is where a veth's deletion
//! spends its ~20 ms, and nothing a runtime can observe changes during it.
//!
//! Here a forked child sends the request and waits for the kernel's answer,
//! while this process listens for the announcement: it returns as soon as
//! the link is unregistered, or with the kernel's error if the request
//! fails. The child holds nothing of this process (every descriptor but its
//! own is closed) and exits when the kernel is done; its parent is gone by
//! then, so init (or the runtime's subreaper) reaps it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use cni::{code, Error};
use nix::libc;

/// `RTM_DELLINK` (linux/rtnetlink.h).
const RTM_DELLINK: u16 = 17;
/// The `RTNLGRP_LINK` multicast group as a bind mask (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;
/// How long to wait for the kernel before giving up on the link.
const WAIT: Duration = Duration::from_secs(10);

fn os_err(what: &str) -> Error {
    let e = std::io::Error::last_os_error();
    Error::new(code::INTERNAL, format!("delete link: {what}: {e}"))
}

/// A `NETLINK_ROUTE` socket, bound to `groups`.
fn route_socket(groups: u32) -> Result<OwnedFd, Error> {
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(os_err("netlink socket"));
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = groups;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        if libc::bind(fd, std::ptr::addr_of!(addr).cast(), len) < 0 {
            return Err(os_err("bind netlink socket"));
        }
        Ok(sock)
    }
}

/// The request: a netlink header and an `ifinfomsg` naming `index`.
fn request(index: u32) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0..4].copy_from_slice(&32u32.to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_DELLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family, pad, type, then the index.
    m[20..24].copy_from_slice(&(index as i32).to_ne_bytes());
    m
}

/// Whether `buf` (netlink messages) announces the deletion of `index`.
fn announces(buf: &[u8], index: u32) -> bool {
    let mut at = 0;
    while at + 24 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        // The link's own announcement (AF_UNSPEC), not a bridge's of a port.
        let family = buf[at + 16];
        if kind == RTM_DELLINK && family == libc::AF_UNSPEC as u8 && word(at + 20) == index {
            return true;
        }
        if len < 16 {
            break;
        }
        at += (len + 3) & !3;
    }
    false
}

/// The child: sends the request, writes the kernel's errno (0: done) to
/// `report`, exits. Only async-signal-safe calls: the parent has threads.
fn child(req: &[u8; 32], report: RawFd) -> ! {
    // SAFETY: raw syscalls only, on descriptors this child owns; no
    // allocation, no lock.
    unsafe {
        // Keep only `report`, as descriptor 3: nothing of the parent's
        // (its stdout to the runtime, its locks) stays open here.
        if report != 3 {
            libc::dup2(report, 3);
        }
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            // Before Linux 5.9: one by one, up to the limit.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as i32
            } else {
                4096
            };
            for fd in 4..top {
                libc::close(fd);
            }
        }
        for fd in 0..3 {
            libc::close(fd);
        }
        let mut errno: i32 = libc::EIO;
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
        if fd >= 0 && libc::send(fd, req.as_ptr().cast(), req.len(), 0) == req.len() as isize {
            let mut buf = [0u8; 1024];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            // NLMSG_ERROR carries the (negative) errno after the header.
            if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
                errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            }
        }
        let bytes = errno.to_ne_bytes();
        libc::write(3, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(0)
    }
}

/// Deletes link `index` of this thread's netns; returns once the kernel
/// unregistered it (see the module's comment). A link already gone is done.
/// `None` when nothing was asked of the kernel (no socket, pipe or child
/// could be made): the caller deletes the link itself.
pub fn del_link(index: u32) -> Option<Result<(), Error>> {
    let listener = match route_socket(RTMGRP_LINK) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e.msg, "no detached delete");
            return None;
        }
    };
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two descriptors this function owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        tracing::debug!(error = %os_err("pipe").msg, "no detached delete");
        return None;
    }
    // SAFETY: both were just created and are owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let req = request(index);
    // SAFETY: the child only runs `child` (async-signal-safe) and exits.
    let pid = match unsafe { libc::fork() } {
        -1 => {
            tracing::debug!(error = %os_err("fork").msg, "no detached delete");
            return None;
        }
        0 => child(&req, write.as_raw_fd()),
        pid => pid,
    };
    Some(wait(index, pid, &listener, read, write))
}

/// Waits for the announcement of `index`'s deletion, or for the child's
/// answer when the kernel refused.
fn wait(
    index: u32,
    pid: libc::pid_t,
    listener: &OwnedFd,
    read: OwnedFd,
    write: OwnedFd,
) -> Result<(), Error> {
    // Reaped here if this process lives on; by init once it exited.
    let _ = std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        });
    drop(write);
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 64 * 1024];
    // Announcements lost (ENOBUFS): the child's answer decides alone.
    let mut listening = true;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                code::TRY_AGAIN_LATER,
                format!("delete link {index}: the kernel did not answer in {WAIT:?}"),
            ));
        }
        let mut polled = [
            libc::pollfd {
                fd: if listening { listener.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: `polled` is a valid array of two pollfds.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), 2, ms) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(os_err("poll"));
        }
        if polled[0].revents != 0 {
            // SAFETY: reads into `buf`, which outlives the call.
            let got = unsafe {
                libc::recv(
                    listener.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if got > 0 && announces(&buf[..got as usize], index) {
                return Ok(());
            }
            // Announcements lost (ENOBUFS): listen no more.
            if got < 0
                && !matches!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EAGAIN | libc::EINTR)
                )
            {
                listening = false;
            }
        }
        if polled[1].revents != 0 {
            let mut word = [0u8; 4];
            // SAFETY: reads four bytes into `word`.
            let got = unsafe { libc::read(read.as_raw_fd(), word.as_mut_ptr().cast(), 4) };
            return match (got, i32::from_ne_bytes(word)) {
                (4, 0) | (4, libc::ENODEV) => Ok(()),
                (4, errno) => Err(Error::new(
                    code::INTERNAL,
                    format!(
                        "delete link {index}: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ),
                )),
                _ => Err(Error::new(
                    code::INTERNAL,
                    format!("delete link {index}: the deleting process died"),
                )),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_and_the_announcement_name_the_index() {
        let req = request(42);
        assert!(announces(&req, 42));
        assert!(!announces(&req, 43));
        let mut two = req.to_vec();
        two[4..6].copy_from_slice(&16u16.to_ne_bytes());
        two.extend_from_slice(&request(7));
        assert!(announces(&two, 7) && !announces(&two, 42));
    }
}
