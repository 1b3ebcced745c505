//! The IPAM side of a plugin: run the IPAM plugin the config names (in
//! process when it is one of this binary's built-ins, `plexus-ipam`; exec'd
//! from `CNI_PATH` otherwise, as every CNI plugin does), and put what it hands
//! out on an interface.

use cni::exec::{Executor, Invocation};
use cni::plugin::{Command, Request};
use cni::result::{Interface, Route};
use cni::{code, CniResult, Error};
use serde_json::Value;

use crate::kernel::netlink::Netns;

/// The IPAM plugin of one request.
pub struct Ipam<'a> {
    exec: Executor,
    kind: String,
    inv: Invocation,
    req: &'a Request,
}

impl<'a> Ipam<'a> {
    /// The `ipam` section's plugin, if the config has one.
    pub fn of(req: &'a Request) -> Result<Option<Ipam<'a>>, Error> {
        let Some(section) = &req.conf.ipam else {
            return Ok(None);
        };
        let kind = section
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::new(code::INVALID_NETWORK_CONFIG, "\"ipam\" has no \"type\""))?;
        Ok(Some(Ipam {
            exec: crate::executor(&req.path),
            kind: kind.to_string(),
            inv: Invocation {
                container_id: req.container_id.clone(),
                netns: req.netns.clone(),
                ifname: req.ifname.clone(),
                args: req.args.clone(),
            },
            req,
        }))
    }

    /// The same, required.
    pub fn required(req: &'a Request, plugin: &str) -> Result<Ipam<'a>, Error> {
        Self::of(req)?.ok_or_else(|| {
            Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("{plugin} needs an \"ipam\" section with a \"type\""),
            )
        })
    }

    /// ADD: the addresses handed out; at least one.
    pub fn add(&self) -> Result<CniResult, Error> {
        let raw = self
            .exec
            .exec(&self.kind, Command::Add, &self.inv, &self.req.stdin)?;
        self.parse(&raw)
    }

    /// Runs the IPAM plugin's `command` while `work` runs: an exec'd
    /// plugin is started first and waited for after `work`; a built-in one
    /// runs on a second thread, for ADD moved off this one's CPU
    /// ([`elsewhere`]). DEL's is not: moved, DEL measured 0.3 ms slower in
    /// the bench (the link teardown beside it waits on the kernel's grace
    /// periods, which a busy second CPU may well lengthen).
    fn beside<T>(&self, command: Command, work: impl FnOnce() -> T) -> (T, Result<Vec<u8>, Error>) {
        if self.exec.is_builtin(&self.kind) {
            // The thread logs inside the call's span, as the caller does.
            let span = tracing::Span::current();
            let (exec, kind, inv) = (self.exec.clone(), self.kind.clone(), self.inv.clone());
            let stdin = self.req.stdin.clone();
            let spawned = std::thread::Builder::new().spawn(move || {
                let _entered = span.enter();
                exec.exec(&kind, command, &inv, &stdin)
            });
            let Ok(ipam) = spawned else {
                // No thread to be had: one after the other.
                let theirs = self
                    .exec
                    .exec(&self.kind, command, &self.inv, &self.req.stdin);
                return (work(), theirs);
            };
            if command == Command::Add {
                elsewhere(&ipam);
            }
            let mine = work();
            let theirs = ipam
                .join()
                .unwrap_or_else(|_| Err(Error::new(code::INTERNAL, "IPAM thread panicked")));
            return (mine, theirs);
        }
        let running = self
            .exec
            .start(&self.kind, command, &self.inv, &self.req.stdin);
        let mine = work();
        (mine, running.and_then(|r| r.wait()))
    }

    /// ADD while `work` runs (see [`Ipam::beside`]).
    pub fn add_beside<T>(&self, work: impl FnOnce() -> T) -> (T, Result<CniResult, Error>) {
        let (mine, raw) = self.beside(Command::Add, work);
        (mine, raw.and_then(|raw| self.parse(&raw)))
    }

    /// DEL while `work` runs (see [`Ipam::beside`]).
    pub fn del_beside<T>(&self, work: impl FnOnce() -> T) -> (T, Result<(), Error>) {
        let (mine, raw) = self.beside(Command::Del, work);
        (mine, raw.map(|_| ()))
    }

    fn parse(&self, raw: &[u8]) -> Result<CniResult, Error> {
        let (_, result) = CniResult::from_slice(raw)?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ips: Vec<String> = result.ips.iter().map(|i| i.address.to_string()).collect();
            let routes: Vec<String> = result.routes.iter().map(|r| r.dst.to_string()).collect();
            tracing::debug!(ipam = %self.kind, ifname = %self.inv.ifname,
                ips = %ips.join(","), routes = %routes.join(","), "IPAM answered");
        }
        if result.ips.is_empty() {
            return Err(Error::new(
                code::INTERNAL,
                format!("IPAM {} returned no address", self.kind),
            ));
        }
        Ok(result)
    }

    /// DEL: release.
    pub fn del(&self) -> Result<(), Error> {
        self.exec
            .exec(&self.kind, Command::Del, &self.inv, &self.req.stdin)
            .map(|_| ())
    }

    /// GC: the IPAM plugin releases what `cni.dev/valid-attachments` lacks.
    /// An IPAM plugin that predates GC (it refuses the version or the
    /// command) has nothing to collect: a warning, not a failure.
    pub fn gc(&self) -> Result<(), Error> {
        match self
            .exec
            .exec(&self.kind, Command::Gc, &self.inv, &self.req.stdin)
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.code == code::INCOMPATIBLE_VERSION || e.code == code::INVALID_ENVIRONMENT =>
            {
                tracing::warn!(ipam = %self.kind, error = %e.msg, "IPAM plugin cannot GC");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// STATUS of the IPAM plugin.
    pub fn status(&self) -> Result<(), Error> {
        self.exec
            .exec(&self.kind, Command::Status, &self.inv, &self.req.stdin)
            .map(|_| ())
    }

    /// CHECK of the IPAM plugin itself.
    pub fn check(&self) -> Result<(), Error> {
        self.exec
            .exec(&self.kind, Command::Check, &self.inv, &self.req.stdin)
            .map(|_| ())
    }
}

/// Puts IPAM's addresses (IPv6 without DAD: IPAM made them unique) and routes
/// on link `index`; a route without a gateway goes via the address's gateway
/// of its family, or on-link when there is none.
pub fn configure(ns: &Netns, index: u32, ipam: &CniResult) -> Result<Vec<Route>, Error> {
    for ip in &ipam.ips {
        ns.add_address(index, ip.address, ip.address.is_ipv6())?;
    }
    let mut routes = Vec::new();
    for r in &ipam.routes {
        let gw = r.gw.or_else(|| {
            ipam.ips
                .iter()
                .filter(|i| i.address.is_ipv4() == r.dst.is_ipv4())
                .find_map(|i| i.gateway)
        });
        ns.add_route(r.dst, gw, index)?;
        routes.push(Route { gw, ..r.clone() });
    }
    Ok(routes)
}

/// What of `prev`'s addresses and routes the kernel no longer holds on link
/// `index`, as one sentence for a drift error (`"eth0 lacks …"`); `None`
/// when everything is there.
pub fn lacks(
    ns: &Netns,
    index: u32,
    ifname: &str,
    prev: &CniResult,
    iface: usize,
) -> Result<Option<String>, Error> {
    let have = ns.addresses(index)?;
    let mut out = Vec::new();
    for ip in prev
        .ips
        .iter()
        .filter(|i| i.interface.is_none_or(|n| n == iface))
    {
        if !have.contains(&ip.address) {
            out.push(format!("address {} (has {have:?})", ip.address));
        }
    }
    // One dump per family the routes need, not one per route.
    let dump = |v6: bool| -> Result<Vec<_>, Error> {
        if prev.routes.iter().any(|r| r.dst.is_ipv6() == v6) {
            ns.routes(v6)
        } else {
            Ok(Vec::new())
        }
    };
    let (v4, v6) = (dump(false)?, dump(true)?);
    for r in &prev.routes {
        let routes = if r.dst.is_ipv6() { &v6 } else { &v4 };
        if !routes
            .iter()
            .any(|k| k.dst == r.dst && k.gw == r.gw && k.oif == Some(index))
        {
            out.push(format!("route {} via {:?}", r.dst, r.gw));
        }
    }
    Ok((!out.is_empty()).then(|| format!("{ifname} lacks {}", out.join(", "))))
}

/// The result of a plugin with one interface in the pod: IPAM's addresses
/// on it (interface 0), `routes`, IPAM's DNS.
pub fn on_interface(interface: Interface, ipam: &CniResult, routes: Vec<Route>) -> CniResult {
    let mut result = CniResult {
        interfaces: vec![interface],
        ips: ipam.ips.clone(),
        routes,
        dns: ipam.dns.clone(),
    };
    for ip in &mut result.ips {
        ip.interface = Some(0);
    }
    result
}

/// The `prevResult` CHECK checks against (code 7 without one).
pub fn prev_result(req: &Request) -> Result<CniResult, Error> {
    let prev = req
        .conf
        .prev_result
        .as_ref()
        .ok_or_else(|| Error::new(code::INVALID_NETWORK_CONFIG, "CHECK needs prevResult"))?;
    Ok(CniResult::from_json(prev)?.1)
}

/// STATUS of a plugin whose only dependency is its IPAM, if it has one.
pub fn status(req: &Request) -> Result<(), Error> {
    match Ipam::of(req)? {
        Some(ipam) => ipam.status(),
        None => Ok(()),
    }
}

/// Moves a thread just started off the CPU the caller runs on, to the
/// others this process may use. The scheduler queues a new thread on its
/// parent's CPU; an idle CPU often does not take it over in time, and it
/// then waits until the parent blocks, so that IPAM would run after the link
/// work instead of beside it. Measured here (plexus ADD, median of 60): IPAM
/// began 1.0 ms after the thread was started, 0.2 ms once moved, and the
/// call took 2.2 ms, 2.0 ms moved. With one CPU to use, it stays.
fn elsewhere<T>(thread: &std::thread::JoinHandle<T>) {
    use nix::libc;
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: a zeroed cpu_set_t is an empty set, which the calls below
    // fill and read within its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return;
        }
        let Ok(here) = usize::try_from(libc::sched_getcpu()) else {
            return;
        };
        libc::CPU_CLR(here, &mut set);
        if libc::CPU_COUNT(&set) > 0 {
            // std's id of the thread is an integer; musl's pthread_t a pointer.
            let id = thread.as_pthread_t() as libc::pthread_t;
            libc::pthread_setaffinity_np(id, size, &set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detached::tests::allowed;

    #[test]
    fn a_thread_moved_elsewhere_may_use_every_cpu_but_one() {
        let before = allowed();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _ = wait.recv();
            allowed()
        });
        elsewhere(&thread);
        let _ = go.send(());
        let after = thread.join().expect("thread");
        if before.len() > 1 {
            assert_eq!(after.len(), before.len() - 1, "one CPU fewer: {after:?}");
            assert!(
                after.iter().all(|c| before.contains(c)),
                "{after:?} within {before:?}"
            );
        } else {
            assert_eq!(after, before, "a lone CPU stays");
        }
    }
}
