//! `plexus`, the meta-plugin: attaches the cluster network and the secondary
//! networks a pod asks for, by running each network's plugins as delegates.

mod node;
mod plan;
mod selection;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use cni::args::CniArgs;
use cni::cache::{Cache, CacheEntry};
use cni::config::Attachment;
use cni::exec::{Executor, Invocation};
use cni::plugin::{Plugin, Request};
use cni::result::Route;
use cni::{code, CniResult, Error, NetConfList};
use ipnetwork::IpNetwork;
use serde_json::Value;
use tracing::{info, warn};

pub use node::NodeConf;
use plan::{Delegate, Record};

const RECORD_KEY: &str = "plexus";

/// The meta-plugin.
pub struct Meta;

/// Everything one invocation works with, read once.
struct Call<'a> {
    req: &'a Request,
    node: NodeConf,
    args: CniArgs,
    pod_ns: String,
    exec: Executor,
    cache: Cache,
}

impl<'a> Call<'a> {
    fn new(req: &'a Request) -> Result<Self, Error> {
        let node = NodeConf::parse(&req.conf.extra)?;
        crate::log::init(node.log_file.as_deref(), &node.log_level);
        let args = CniArgs::parse(&req.args)?;
        let pod_ns = plan::pod_namespace(&args);
        Ok(Call {
            exec: crate::executor(&req.path),
            cache: Cache::new(&node.cache_dir),
            req,
            node,
            args,
            pod_ns,
        })
    }

    fn invocation(&self, d: &Delegate) -> Invocation {
        Invocation {
            container_id: self.req.container_id.clone(),
            netns: self.req.netns.clone(),
            ifname: d.ifname.clone(),
            args: self.req.args.clone(),
        }
    }

    fn record(&self) -> Option<(CacheEntry, Record)> {
        let entry = self.cache.get(
            &self.req.conf.name,
            &self.req.container_id,
            &self.req.ifname,
        )?;
        let record = serde_json::from_value(entry.extra.get(RECORD_KEY)?.clone()).ok()?;
        Some((entry, record))
    }

    fn save(&self, entry: &mut CacheEntry, record: &Record) -> Result<(), Error> {
        let v = serde_json::to_value(record).unwrap_or(Value::Null);
        entry.extra.insert(RECORD_KEY.into(), v);
        self.cache.put(entry)
    }

    fn new_entry(&self) -> CacheEntry {
        let mut entry = CacheEntry::new(
            &self.req.conf.name,
            &self.req.container_id,
            &self.req.ifname,
            &self.req.stdin,
        );
        entry.netns = self.req.netns.clone();
        entry.cni_args = self
            .args
            .0
            .iter()
            .map(|(k, v)| [k.clone(), v.clone()])
            .collect();
        entry
    }

    /// Undoes a failed ADD: the attached delegates strictly (those whose DEL
    /// fails stay recorded for the runtime's DEL to retry), the failing one
    /// best effort (it should have cleaned up after itself).
    fn undo(
        &self,
        e: Error,
        entry: &mut CacheEntry,
        attached: &[Delegate],
        failed: Option<&Delegate>,
    ) -> Error {
        if let Some(d) = failed {
            for err in self.del_all(std::slice::from_ref(d)) {
                warn!(error = %err, "cleanup of the failed delegate: ignored");
            }
        }
        let mut left = Vec::new();
        let mut undo_errors = Vec::new();
        for d in attached.iter().rev() {
            if let Some(err) = self.del_all(std::slice::from_ref(d)).pop() {
                undo_errors.push(err.to_string());
                left.push(d.clone());
            }
        }
        let kept = if left.is_empty() {
            self.cache.remove(
                &self.req.conf.name,
                &self.req.container_id,
                &self.req.ifname,
            )
        } else {
            self.save(entry, &Record { delegates: left })
        };
        if let Err(err) = kept {
            undo_errors.push(err.to_string());
        }
        if undo_errors.is_empty() {
            return e;
        }
        let details = format!(
            "{}; undo also failed: {}",
            e.details,
            undo_errors.join("; ")
        );
        let details = details.trim_start_matches("; ").to_string();
        e.with_details(details)
    }

    /// DEL of delegates in reverse, continuing past failures.
    fn del_all(&self, delegates: &[Delegate]) -> Vec<Error> {
        let mut errors = Vec::new();
        for d in delegates.iter().rev() {
            let inv = self.invocation(d);
            match self
                .exec
                .del_list(&d.list, &inv, &d.caps, d.result.as_ref())
            {
                Ok(()) => info!(network = %d.network, ifname = %d.ifname, "detached"),
                Err(e) => {
                    let e = e.context(format!("network {:?} ({})", d.network, d.ifname));
                    warn!(error = %e, "DEL failed");
                    errors.push(e);
                }
            }
        }
        errors
    }
}

impl Plugin for Meta {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let call = Call::new(req)?;
        let rt = req.conf.runtime_config.as_ref();
        let mut delegates = plan::build(&call.node, rt, &call.pod_ns, &req.ifname, false)?;
        for d in &delegates {
            for i in 0..d.list.plugins.len() {
                call.exec.available(d.list.plugin_type(i))?;
            }
        }
        // Record the intent first: a crash half-way still leaves DEL a list.
        let mut entry = call.new_entry();
        let mut record = Record {
            delegates: delegates.clone(),
        };
        call.save(&mut entry, &record)?;
        let mut merged: Option<CniResult> = None;
        for i in 0..delegates.len() {
            let d = &delegates[i];
            let attached = call
                .exec
                .add_list(&d.list, &call.invocation(d), &d.caps)
                .and_then(|raw| CniResult::from_json(&raw).map(|(_, r)| (raw, r)));
            let (raw, result) = match attached {
                Ok(ok) => ok,
                Err(e) => {
                    let e = e.context(format!("network {:?} ({})", d.network, d.ifname));
                    warn!(error = %e, container = %req.container_id, "ADD failed, undoing");
                    return Err(call.undo(e, &mut entry, &delegates[..i], Some(d)));
                }
            };
            info!(network = %d.network, ifname = %d.ifname, container = %req.container_id, "attached");
            match &mut merged {
                None => merged = Some(result),
                Some(m) => m.append_interfaces(&result),
            }
            delegates[i].result = Some(raw);
            record.delegates[i].result = delegates[i].result.clone();
            // The last result goes into the final write below.
            if i + 1 < delegates.len() {
                call.save(&mut entry, &record)?;
            }
        }
        let mut merged = merged.unwrap_or_default();
        if let Err(e) = default_routes(req, &delegates, &mut merged) {
            warn!(error = %e, container = %req.container_id, "default-route failed, undoing");
            return Err(call.undo(e, &mut entry, &delegates, None));
        }
        entry.result = Some(merged.to_json(req.version));
        call.save(&mut entry, &record)?;
        Ok(merged)
    }

    fn del(&self, req: &Request) -> Result<(), Error> {
        let call = Call::new(req)?;
        if let Some((_, record)) = call.record() {
            cni::error::combine(call.del_all(&record.delegates))?;
            return call
                .cache
                .remove(&req.conf.name, &req.container_id, &req.ifname);
        }
        // No record: DEL already ran, or the cache was lost. Rebuild the list
        // from the config and release what may be left, but never fail on it.
        let rt = req.conf.runtime_config.as_ref();
        match plan::build(&call.node, rt, &call.pod_ns, &req.ifname, true) {
            Ok(delegates) => {
                for e in call.del_all(&delegates) {
                    warn!(error = %e, container = %req.container_id, "DEL without record: ignored");
                }
            }
            Err(e) => {
                warn!(error = %e, container = %req.container_id, "DEL without record: nothing to undo")
            }
        }
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let call = Call::new(req)?;
        let Some((_, record)) = call.record() else {
            return Err(Error::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "no attachment of {} ({}) is recorded",
                    req.container_id, req.ifname
                ),
            )
            .with_details(format!("cache dir {}", call.node.cache_dir.display())));
        };
        for d in &record.delegates {
            let Some(result) = &d.result else {
                return Err(Error::new(
                    code::INTERNAL,
                    format!("network {:?} ({}) was never attached", d.network, d.ifname),
                ));
            };
            call.exec
                .check_list(&d.list, &call.invocation(d), &d.caps, result)
                .map_err(|e| e.context(format!("network {:?} ({})", d.network, d.ifname)))?;
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), Error> {
        let call = Call::new(req)?;
        let valid: BTreeSet<Attachment> = req
            .conf
            .valid_attachments
            .iter()
            .flatten()
            .cloned()
            .collect();
        let mut errors = Vec::new();
        let mut still_valid: BTreeSet<Attachment> = BTreeSet::new();
        for entry in call.cache.list(&req.conf.name) {
            let att = Attachment {
                container_id: entry.container_id.clone(),
                ifname: entry.ifname.clone(),
            };
            let record: Record = entry
                .extra
                .get(RECORD_KEY)
                .and_then(|r| serde_json::from_value(r.clone()).ok())
                .unwrap_or_default();
            if valid.contains(&att) {
                still_valid.extend(record.delegates.iter().map(|d| Attachment {
                    container_id: att.container_id.clone(),
                    ifname: d.ifname.clone(),
                }));
                continue;
            }
            info!(container = %att.container_id, ifname = %att.ifname, "GC: releasing stale attachment");
            // The sandbox may still exist; then its interfaces go too.
            let netns = if !entry.netns.is_empty() && std::path::Path::new(&entry.netns).exists() {
                entry.netns.clone()
            } else {
                String::new()
            };
            let del_req = Request {
                container_id: att.container_id.clone(),
                ifname: att.ifname.clone(),
                netns,
                ..req.clone()
            };
            let stale = Call {
                req: &del_req,
                ..Call::new(req)?
            };
            let failed = stale.del_all(&record.delegates);
            if failed.is_empty() {
                let _ = call
                    .cache
                    .remove(&req.conf.name, &att.container_id, &att.ifname);
            }
            errors.extend(failed);
        }
        // Delegates that speak GC themselves get the attachments still in use.
        let valid_list: Vec<Attachment> = still_valid.into_iter().collect();
        for list in all_lists(&call) {
            if let Err(e) = call.exec.gc_list(&list, &valid_list) {
                errors.push(e.context(format!("network {:?}", list.name)));
            }
        }
        cni::error::combine(errors)
    }

    fn status(&self, req: &Request) -> Result<(), Error> {
        let call = Call::new(req)?;
        let unavailable = |e: Error| Error::new(code::PLUGIN_NOT_AVAILABLE, e.to_string());
        let defs = plan::load_definitions(&call.node).map_err(unavailable)?;
        for problem in defs.problems() {
            warn!(%problem, "network definition unusable");
        }
        let cluster = plan::cluster_list(&call.node, &defs, "default").map_err(unavailable)?;
        for i in 0..cluster.plugins.len() {
            call.exec
                .find(cluster.plugin_type(i))
                .map_err(unavailable)?;
        }
        call.exec.status_list(&cluster)
    }
}

/// Moves the pod's default route onto the networks whose selection asks for
/// it, in the kernel and in the result.
fn default_routes(
    req: &Request,
    delegates: &[Delegate],
    result: &mut CniResult,
) -> Result<(), Error> {
    let wanted: Vec<(&Delegate, IpAddr)> = delegates
        .iter()
        .flat_map(|d| d.default_route.iter().map(move |gw| (d, *gw)))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let ns = crate::netlink::Netns::open(Path::new(&req.netns))?;
    for (d, gw) in wanted {
        ns.replace_default_route(&d.ifname, gw)
            .map_err(|e| e.context(format!("network {:?} ({})", d.network, d.ifname)))?;
        info!(network = %d.network, ifname = %d.ifname, %gw, "default route moved");
        result
            .routes
            .retain(|r| !(r.dst.prefix() == 0 && r.dst.is_ipv4() == gw.is_ipv4()));
        let any = match gw {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let dst = IpNetwork::new(any, 0).map_err(|e| Error::new(code::INTERNAL, e.to_string()))?;
        result.routes.push(Route::new(dst, Some(gw)));
    }
    Ok(())
}

/// The cluster network and every definition, each once.
fn all_lists(call: &Call<'_>) -> Vec<NetConfList> {
    let defs = plan::load_definitions(&call.node).unwrap_or_default();
    let mut lists: Vec<NetConfList> = Vec::new();
    if let Ok(c) = plan::cluster_list(&call.node, &defs, "default") {
        lists.push(c);
    }
    for d in defs.iter() {
        if !lists.iter().any(|l| l == &d.list) {
            lists.push(d.list.clone());
        }
    }
    lists
}
