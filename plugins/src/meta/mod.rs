//! `plexus`, the meta-plugin: attaches the cluster network and the secondary
//! networks a pod asks for, by running each network's plugins as delegates.

pub mod agent;
mod api;
mod attachments;
mod copy;
mod devices;
pub mod groups;
mod journal;
mod node;
mod plan;
pub mod publisher;
mod selection;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use cni::args::CniArgs;
use cni::cache::{Cache, CacheEntry};
use cni::config::Attachment;
use cni::exec::{Executor, Invocation};
use cni::plugin::{Command, Plugin, Request};
use cni::result::Route;
use cni::{code, CniResult, Error, NetConfList};
use ipnetwork::IpNetwork;
use serde_json::Value;
use tracing::{debug, info, warn};

use api::Api;
use journal::Journal;
pub use node::NodeConf;
use plan::{Delegate, Record, Source, RECORD_KEY};

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
    /// The central API, when definitions come from there.
    api: Option<Api>,
    /// The networks of this call, `network@ifname`, for its log line.
    networks: Vec<String>,
    /// How the call ended when it did nothing (`already detached`).
    nothing: Option<&'static str>,
    /// The thread writing the pod's security-group table while the
    /// delegates attach (see [`Call::start_filter`]).
    filtering: Cell<Option<std::thread::JoinHandle<Result<(), Error>>>>,
    /// Whether this ADD may have put a security-group table in the pod.
    filtered: Cell<bool>,
}

impl<'a> Call<'a> {
    fn new(req: &'a Request) -> Result<Self, Error> {
        let node = NodeConf::parse(&req.conf.extra)?;
        crate::log::init(&node.log);
        Call::with(req, node)
    }

    fn with(req: &'a Request, node: NodeConf) -> Result<Self, Error> {
        let args = CniArgs::parse(&req.args)?;
        let pod_ns = plan::pod_namespace(&args);
        Ok(Call {
            exec: crate::executor(&req.path),
            cache: Cache::new(&node.cache_dir),
            api: node.api.as_ref().map(|a| Api::new(a, &node.cache_dir)),
            req,
            node,
            args,
            pod_ns,
            networks: Vec::new(),
            nothing: None,
            filtering: Cell::new(None),
            filtered: Cell::new(false),
        })
    }

    /// Starts writing the delegates' security groups into the pod's netns,
    /// on a thread, while the delegates attach: the table is in force
    /// before any of its interfaces exists. Members of remote groups come
    /// from the API's Attachment records; the pod's own addresses, not
    /// known yet, are added by [`Call::finish_filter`]. Returns the
    /// table's steps.
    fn start_filter(&mut self, delegates: &[Delegate]) -> Result<Vec<groups::Step>, Error> {
        let remote = groups::remote_groups(delegates.iter().flat_map(|d| d.rules.iter()));
        let mut members: std::collections::BTreeMap<String, Vec<IpAddr>> = Default::default();
        if !remote.is_empty() {
            let Some(api) = &mut self.api else {
                return Err(Error::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!(
                        "rules with a remote group ({remote:?}) need the central API: it knows the groups' members"
                    ),
                ));
            };
            // Members elsewhere, from their Attachment records; a moment
            // late is safe (a member not yet known is refused, not let in).
            let prefix = conf::api::ATTACHMENT.prefix(Some(&self.pod_ns));
            match api.range(&prefix) {
                Ok(kvs) => {
                    for spec in kvs.iter().filter_map(|kv| groups::attachment(&kv.value)) {
                        groups::add_members(&mut members, &spec.security_groups, &spec.addresses);
                    }
                }
                Err(e) => warn!(error = %e,
                    "members of remote groups unknown (etcd): their traffic is refused until they are"),
            }
        }
        let filtered: Vec<groups::Filtered<'_>> = delegates
            .iter()
            .filter(|d| !d.groups.is_empty())
            .map(|d| groups::Filtered {
                ifname: &d.ifname,
                rules: &d.rules,
            })
            .collect();
        let steps = groups::ruleset(&filtered, &members)?;
        let netns = std::path::PathBuf::from(&self.req.netns);
        let span = tracing::Span::current();
        let interfaces = filtered.len();
        let writing = steps.clone();
        self.filtered.set(true);
        let thread = std::thread::Builder::new()
            .spawn(move || {
                let _entered = span.enter();
                let started = std::time::Instant::now();
                groups::apply(&netns, &writing)?;
                debug!(
                    interfaces,
                    duration_ms = crate::log::ms_since(started),
                    "security groups applied beside the delegates"
                );
                Ok(())
            })
            .map_err(|e| Error::new(code::INTERNAL, format!("security groups: no thread: {e}")))?;
        self.filtering.set(Some(thread));
        Ok(steps)
    }

    /// Waits for the table [`Call::start_filter`] writes.
    fn join_filter(&self) -> Result<(), Error> {
        match self.filtering.take() {
            None => Ok(()),
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::new(
                    code::INTERNAL,
                    "security groups: the thread panicked",
                ))
            }),
        }
    }

    /// Once the delegates attached: the table is in force, and the pod's
    /// own addresses are in the sets of its groups that its rules name.
    /// The table's shape (its steps without members), which CHECK compares
    /// the kernel's table with.
    fn finish_filter(
        &self,
        delegates: &[Delegate],
        steps: &[groups::Step],
    ) -> Result<Value, Error> {
        self.join_filter()?;
        let mut own: std::collections::BTreeMap<String, Vec<IpAddr>> = Default::default();
        for d in delegates {
            let Some(raw) = &d.result else { continue };
            let (addresses, _) = attachments::addresses(raw, &d.ifname);
            groups::add_members(&mut own, &d.groups, &addresses);
        }
        let sets: BTreeSet<&str> = steps
            .iter()
            .filter_map(|s| match s {
                groups::Step::AddSet { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let mut adds = Vec::new();
        for (group, addresses) in &own {
            for v6 in [false, true] {
                let set = groups::set_name(group, v6);
                let elements: Vec<IpAddr> = addresses
                    .iter()
                    .filter(|a| a.is_ipv6() == v6)
                    .copied()
                    .collect();
                if sets.contains(set.as_str()) && !elements.is_empty() {
                    adds.push(groups::Step::AddElements { set, elements });
                }
            }
        }
        if !adds.is_empty() {
            groups::apply(Path::new(&self.req.netns), &adds)?;
        }
        serde_json::to_value(groups::shape(steps))
            .map_err(|e| Error::new(code::INTERNAL, format!("security groups: {e}")))
    }

    /// The networks as the pod asked for them (before a plan names them).
    fn asked(&self) -> Vec<String> {
        let mut out = vec![match &self.node.cluster {
            node::ClusterNetwork::Named(name) => format!("{name}@{}", self.req.ifname),
            node::ClusterNetwork::Inline(list) => format!("{}@{}", list.name, self.req.ifname),
        }];
        match plan::selections(self.req.conf.runtime_config.as_ref()) {
            Ok(sel) => out.extend(sel.iter().map(|s| {
                let name = match &s.namespace {
                    Some(ns) => format!("{ns}/{}", s.name),
                    None => s.name.clone(),
                };
                format!("{name}@{}", s.interface.as_deref().unwrap_or("?"))
            })),
            Err(_) => out.push("(unreadable networks annotation)".into()),
        }
        out
    }

    fn planned(&mut self, delegates: &[Delegate]) {
        self.networks = delegates
            .iter()
            .map(|d| {
                let network = d.origin.as_ref().map_or(&d.network, |o| &o.network);
                format!("{network}@{}", d.ifname)
            })
            .collect();
    }

    /// Where definitions come from: the API, else `confDir`.
    fn source<'s>(api: &'s mut Option<Api>, dir: &'s mut plan::Dir<'_>) -> &'s mut dyn Source {
        match api {
            Some(api) => api,
            None => dir,
        }
    }

    /// Every delegate this pod gets (see [`plan::build`]).
    fn plan(&mut self, lenient: bool) -> Result<Vec<Delegate>, Error> {
        let mut dir = plan::Dir(&self.node);
        let source = Call::source(&mut self.api, &mut dir);
        let rt = self.req.conf.runtime_config.as_ref();
        let delegates = plan::build(
            &self.node,
            source,
            rt,
            &self.pod_ns,
            &self.req.ifname,
            lenient,
        )?;
        let mut delegates = delegates;
        if !lenient {
            let pod = self.args.get("K8S_POD_NAME").unwrap_or_default();
            devices::assign(
                &mut delegates,
                &self.node.pod_resources_socket,
                &self.pod_ns,
                pod,
            )?;
        }
        self.planned(&delegates);
        Ok(delegates)
    }

    fn journal(&self) -> Journal {
        Journal::new(&self.node.cache_dir)
    }

    /// The pod as its Attachment records name it.
    fn attachment_pod(&self) -> attachments::Pod<'_> {
        attachments::Pod {
            // Outside Kubernetes a sandbox has no pod name; its id stands in.
            name: self
                .args
                .get("K8S_POD_NAME")
                .filter(|n| !n.is_empty())
                .unwrap_or(&self.req.container_id),
            namespace: &self.pod_ns,
            container_id: &self.req.container_id,
        }
    }

    /// The keys of the Attachment records these delegates get (none without
    /// the API), known before anything is attached.
    fn attachment_keys(&self, delegates: &[Delegate]) -> Vec<String> {
        if self.api.is_none() {
            return Vec::new();
        }
        let pod = self.attachment_pod();
        delegates
            .iter()
            .map(|d| attachments::key(&pod, &d.ifname))
            .collect()
    }

    /// The Attachment records of what ADD attached.
    fn attachment_records(&self, delegates: &[Delegate]) -> Vec<(String, String)> {
        match attachments::node_name(self.node.node_name.as_deref()) {
            Ok(node) => attachments::records(&self.attachment_pod(), &node, delegates),
            Err(e) => {
                warn!(error = %e, "Attachment records not written");
                Vec::new()
            }
        }
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
        let record = Record::of(&entry)?;
        Some((entry, record))
    }

    fn save(&self, entry: &mut CacheEntry, record: &Record) -> Result<(), Error> {
        self.write(entry, record, false)
    }

    /// The first record of an attachment (its intent): written straight
    /// into place, as nothing is there to replace. One cut short by a kill
    /// does not read, and DEL then detaches from the config (nothing was
    /// attached yet).
    fn save_first(&self, entry: &mut CacheEntry, record: &Record) -> Result<(), Error> {
        self.write(entry, record, true)
    }

    fn write(&self, entry: &mut CacheEntry, record: &Record, first: bool) -> Result<(), Error> {
        let v = serde_json::to_value(record).unwrap_or(Value::Null);
        entry.extra.insert(RECORD_KEY.into(), v);
        let started = std::time::Instant::now();
        let saved = match first {
            true => self.cache.create(entry),
            false => self.cache.put(entry),
        };
        debug!(record = %self.cache.path(&entry.network_name, &entry.container_id, &entry.ifname).display(),
            delegates = record.delegates.len(),
            attached = record.delegates.iter().filter(|d| d.result.is_some()).count(),
            duration_ms = crate::log::ms_since(started),
            ok = saved.is_ok(), "record written");
        saved
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
        with_undo_errors(e, self.undo_all(entry, attached, failed))
    }

    /// What [`Call::undo`] does; what of it failed.
    fn undo_all(
        &self,
        entry: &mut CacheEntry,
        attached: &[Delegate],
        failed: Option<&Delegate>,
    ) -> Vec<String> {
        // The security-group table, written beside the delegates, goes
        // with them.
        if let Err(e) = self.join_filter() {
            warn!(error = %e, "security groups were not applied");
        }
        let mut table_left = None;
        if self.filtered.take() && Path::new(&self.req.netns).exists() {
            if let Err(e) = groups::remove(Path::new(&self.req.netns)) {
                table_left = Some(format!("security groups: {e}"));
            }
        }
        if let Some(d) = failed {
            for err in self.del_all(std::slice::from_ref(d)) {
                warn!(error = %err, "cleanup of the failed delegate: ignored");
            }
        }
        let mut left = Vec::new();
        let mut undo_errors: Vec<String> = table_left.into_iter().collect();
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
            self.save(
                entry,
                &Record {
                    delegates: left,
                    attachments: Vec::new(),
                    filter: None,
                },
            )
        };
        if let Err(err) = kept {
            undo_errors.push(err.to_string());
        }
        undo_errors
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
                Ok(()) => {
                    debug!(network = %d.network, ifname = %d.ifname, "detached");
                    crate::crash::point("plexus.delegate-detached");
                }
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

/// `e`, with what of its undo failed in its details.
fn with_undo_errors(e: Error, undo_errors: Vec<String>) -> Error {
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

/// How one attempt at an ADD ended.
enum Attempt {
    Done(CniResult),
    /// Planned from the local copy, which etcd no longer matches: nothing
    /// is left attached, and ADD starts again from etcd.
    Again,
}

impl Call<'_> {
    /// After an attempt planned from the local copy failed with `e`: `e`,
    /// unless definitions changed meanwhile (then the attempt is made again
    /// from etcd: a network just defined is not "not found").
    /// `planning`: `e` came from planning, before anything was attached.
    fn failed(&mut self, e: Error, planning: bool) -> Result<Attempt, Error> {
        let Some(api) = &mut self.api else {
            return Err(e);
        };
        match api.confirm()? {
            api::Confirmed::Same => Err(e),
            api::Confirmed::Changed => {
                info!(error = %e.msg,
                    "definitions changed during ADD: planning again from etcd");
                Ok(Attempt::Again)
            }
            // Planned again from the copy, knowing etcd is down: a network
            // the copy lacks is then "try again later", not "not found".
            api::Confirmed::Unreachable if planning => Ok(Attempt::Again),
            api::Confirmed::Unreachable => Err(e),
        }
    }

    /// The delegates this pod gets, each of whose plugins can run.
    fn plan_runnable(&mut self) -> Result<Vec<Delegate>, Error> {
        let delegates = self.plan(false)?;
        for d in &delegates {
            for i in 0..d.list.plugins.len() {
                self.exec.available(d.list.plugin_type(i))?;
            }
        }
        Ok(delegates)
    }
}

/// One attempt at an ADD: plans, attaches every delegate, records.
fn add_once(call: &mut Call<'_>, req: &Request) -> Result<Attempt, Error> {
    let planning = std::time::Instant::now();
    let mut delegates = match call.plan_runnable() {
        Ok(d) => d,
        Err(e) => return call.failed(e, true),
    };
    debug!(
        delegates = delegates.len(),
        duration_ms = crate::log::ms_since(planning),
        "planned"
    );
    // Record the intent first: a crash half-way still leaves DEL a list.
    let mut entry = call.new_entry();
    // The record names the Attachment records from the start: a DEL
    // after a crash anywhere in between removes whatever was written.
    let mut record = Record {
        delegates: delegates.clone(),
        attachments: call.attachment_keys(&delegates),
        filter: None,
    };
    call.save_first(&mut entry, &record)?;
    crate::crash::point("plexus.intent-recorded");
    crate::ipam::adding_recorded_attachments();
    // A network with groups whose table cannot be written attaches nothing.
    let filter = if delegates.iter().any(|d| !d.groups.is_empty()) {
        match call.start_filter(&delegates) {
            Ok(steps) => Some(steps),
            Err(e) => return Err(call.undo(e.context("security groups"), &mut entry, &[], None)),
        }
    } else {
        None
    };
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
                warn!(error = %e, "ADD failed, undoing");
                let undo_errors = call.undo_all(&mut entry, &delegates[..i], Some(d));
                if !undo_errors.is_empty() {
                    // Not all of it undone: the runtime's DEL finishes.
                    return Err(with_undo_errors(e, undo_errors));
                }
                return call.failed(e, false);
            }
        };
        debug!(network = %d.network, ifname = %d.ifname, "attached");
        crate::crash::point("plexus.delegate-attached");
        match &mut merged {
            None => merged = Some(result),
            Some(m) => m.append_interfaces(&result),
        }
        delegates[i].result = Some(raw);
        record.delegates[i].result = delegates[i].result.clone();
        // The last result goes into the final write below.
        if i + 1 < delegates.len() {
            call.save(&mut entry, &record)?;
            crate::crash::point("plexus.result-recorded");
        }
    }
    let mut merged = merged.unwrap_or_default();
    if let Err(e) = default_routes(req, &delegates, &mut merged) {
        warn!(error = %e, "default-route failed, undoing");
        let undo_errors = call.undo_all(&mut entry, &delegates, None);
        if !undo_errors.is_empty() {
            return Err(with_undo_errors(e, undo_errors));
        }
        // Planned from the local copy: maybe not what etcd says.
        return call.failed(e, false);
    }
    // Definitions planned from the local copy are what etcd holds, or all
    // of it is undone and done again from etcd.
    let confirmed = match &mut call.api {
        Some(api) => api.confirm(),
        None => Ok(api::Confirmed::Same),
    };
    match confirmed {
        Ok(api::Confirmed::Same | api::Confirmed::Unreachable) => {}
        Ok(api::Confirmed::Changed) => {
            let undo_errors = call.undo_all(&mut entry, &delegates, None);
            if !undo_errors.is_empty() {
                // Not all of it undone: the runtime's DEL finishes.
                return Err(Error::new(
                    code::TRY_AGAIN_LATER,
                    "network definitions changed during ADD, and undoing failed",
                )
                .with_details(undo_errors.join("; ")));
            }
            info!("definitions changed during ADD: undone, attaching again from etcd");
            return Ok(Attempt::Again);
        }
        Err(e) => return Err(call.undo(e, &mut entry, &delegates, None)),
    }
    // Security groups: the pod never runs unfiltered on a network whose
    // groups say otherwise; if they cannot be put in place, nothing stays.
    if let Some(steps) = &filter {
        match call.finish_filter(&delegates, steps) {
            Ok(shape) => record.filter = Some(shape),
            Err(e) => {
                let e = e.context("security groups");
                warn!(error = %e, "security groups not applied, undoing");
                return Err(call.undo(e, &mut entry, &delegates, None));
            }
        }
    }
    entry.result = Some(merged.to_json(req.version));
    let Some(mut api) = call.api.take() else {
        call.save(&mut entry, &record)?;
        crate::crash::point("plexus.recorded");
        return Ok(Attempt::Done(merged));
    };
    // The record has named the Attachment records' keys since the start: if
    // its save fails, the runtime's DEL still removes them.
    let copy = api.take_copy();
    let journal = call.journal();
    // Written by a process of their own once ADD has answered (see
    // `publisher`), prepared here while the record is saved and started
    // last; written here only when that cannot be, or when etcd is known to
    // be down (then they are journaled at once).
    let records = call.attachment_records(&delegates);
    let inline = records.is_empty() || api.unreachable().is_some();
    let prepare = || {
        let node = &call.node;
        let conf = node.api.as_ref().ok_or("no api")?;
        publisher::prepare(
            conf,
            &node.cache_dir,
            &node.log,
            &req.container_id,
            &req.ifname,
            &records,
        )
    };
    let (saved, prepared) = std::thread::scope(|s| {
        let span = tracing::Span::current();
        let preparing = (!inline).then(|| {
            std::thread::Builder::new().spawn_scoped(s, move || {
                let _entered = span.enter();
                prepare()
            })
        });
        let saved = call.save(&mut entry, &record);
        copy.save();
        let prepared = match preparing {
            None => Err("etcd is unreachable".to_string()),
            Some(Ok(thread)) => thread
                .join()
                .unwrap_or_else(|_| Err("the thread panicked".into())),
            Some(Err(e)) => Err(format!("no thread: {e}")),
        };
        (saved, prepared)
    });
    if let Err(e) = saved {
        // ADD fails: nothing to publish (the runtime's DEL removes what
        // the earlier record named).
        if let Ok(handoff) = prepared {
            handoff.cancel();
        }
        return Err(e);
    }
    let started = prepared.and_then(publisher::Handoff::start);
    match started {
        Ok(()) => {}
        Err(_) if inline => {
            attachments::publish(&mut api, &journal, &req.container_id, &req.ifname, records)
        }
        Err(e) => {
            warn!(error = %e,
                "no publisher for the Attachment records: written before answering");
            attachments::publish(&mut api, &journal, &req.container_id, &req.ifname, records);
        }
    }
    Ok(Attempt::Done(merged))
}

/// Runs one CNI call inside its span (every line carries the command and the
/// container id) and logs its outcome in one line: the pod, its networks, the
/// outcome (the error's code and message on failure) and the duration.
fn logged<T>(req: &Request, f: impl FnOnce(&mut Call<'_>) -> Result<T, Error>) -> Result<T, Error> {
    let started = std::time::Instant::now();
    let node = NodeConf::parse(&req.conf.extra)?;
    crate::log::init(&node.log);
    let cmd = req.command.as_str();
    let span = tracing::info_span!("cni", cmd, container = %req.container_id);
    let _entered = span.enter();
    let ms = || crate::log::ms_since(started);
    let mut call = match Call::with(req, node) {
        Ok(call) => call,
        Err(e) => {
            // `CNI_ARGS` did not parse: the pod is not known by name.
            warn!(pod = "?", ifname = %req.ifname, code = e.code, error = %e.msg,
                details = %e.details, duration_ms = ms(), "{cmd} failed");
            return Err(e);
        }
    };
    let pod = format!(
        "{}/{}",
        call.pod_ns,
        call.args.get("K8S_POD_NAME").unwrap_or_default()
    );
    let outcome = f(&mut call);
    let networks = if call.networks.is_empty() && matches!(req.command, Command::Add) {
        call.asked()
    } else {
        call.networks.clone()
    };
    let networks = networks.join(",");
    match &outcome {
        Ok(_) => info!(%pod, ifname = %req.ifname, %networks,
            outcome = call.nothing.unwrap_or("ok"), duration_ms = ms(), "{cmd}"),
        Err(e) => warn!(%pod, ifname = %req.ifname, %networks, code = e.code,
            error = %e.msg, details = %e.details, duration_ms = ms(), "{cmd} failed"),
    }
    outcome
}

impl Plugin for Meta {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        logged(req, |call| add(call, req))
    }

    fn del(&self, req: &Request) -> Result<(), Error> {
        logged(req, |call| del(call, req))
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        logged(req, |call| check(call, req))
    }

    fn gc(&self, req: &Request) -> Result<(), Error> {
        logged(req, |call| gc(call, req))
    }

    fn status(&self, req: &Request) -> Result<(), Error> {
        logged(req, |call| status(call, req))
    }
}

fn add(call: &mut Call<'_>, req: &Request) -> Result<CniResult, Error> {
    // Attached already (a runtime retrying, as libcni does): never touch
    // what the first ADD made. The same request gets its result again.
    if let Some((entry, record)) = call.record() {
        call.planned(&record.delegates);
        let complete = record.delegates.iter().all(|d| d.result.is_some());
        let same = entry.config_bytes() == req.stdin && entry.netns == req.netns;
        if let (true, true, Some(result)) = (complete, same, &entry.result) {
            call.nothing = Some("already attached: the recorded result");
            return CniResult::from_json(result).map(|(_, r)| r);
        }
        let why = if complete {
            "with another configuration or netns"
        } else {
            "by an ADD that did not finish"
        };
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            format!(
                "{} ({}) is already attached {why}; DEL it first",
                req.container_id, req.ifname
            ),
        )
        .with_details(format!(
            "record {}",
            call.cache
                .path(&req.conf.name, &req.container_id, &req.ifname)
                .display()
        )));
    }
    if let Some(api) = &mut call.api {
        api.speculative();
    }
    match add_once(call, req)? {
        Attempt::Done(result) => Ok(result),
        // The second plan reads etcd: it does not come back here.
        Attempt::Again => match add_once(call, req)? {
            Attempt::Done(result) => Ok(result),
            Attempt::Again => Err(Error::new(
                code::TRY_AGAIN_LATER,
                "network definitions changed during ADD",
            )),
        },
    }
}

fn del(call: &mut Call<'_>, req: &Request) -> Result<(), Error> {
    if let Some((_, record)) = call.record() {
        call.planned(&record.delegates);
        let netns = Path::new(&req.netns);
        let filtered = record.delegates.iter().any(|d| !d.groups.is_empty())
            && !req.netns.is_empty()
            && netns.exists();
        // The table goes on a thread of its own while the delegates
        // detach: the kernel's wait to unhook its chains overlaps theirs.
        let deleted = std::thread::scope(|s| {
            let span = tracing::Span::current();
            let removing = filtered.then(|| {
                s.spawn(move || {
                    let _entered = span.enter();
                    let started = std::time::Instant::now();
                    match groups::remove(netns) {
                        Ok(()) => debug!(
                            duration_ms = crate::log::ms_since(started),
                            "security groups removed"
                        ),
                        Err(e) => warn!(error = %e, "security groups: the pod's table not removed"),
                    }
                })
            });
            let deleted = call.del_all(&record.delegates);
            if let Some(t) = removing {
                let _ = t.join();
            }
            deleted
        });
        cni::error::combine(deleted)?;
        crate::crash::point("plexus.delegates-detached");
        let journal = call.journal();
        if let Some(conf) = &call.node.api {
            // The records are removed after they were written (the
            // publisher gives up after one timeout; this waits two).
            publisher::wait(
                &call.node.cache_dir,
                &req.container_id,
                &req.ifname,
                conf.timeout() * 2 + std::time::Duration::from_secs(1),
            );
        }
        if let Some(api) = &mut call.api {
            attachments::withdraw(
                api,
                &journal,
                &req.container_id,
                &req.ifname,
                &record.attachments,
            );
        }
        return call
            .cache
            .remove(&req.conf.name, &req.container_id, &req.ifname);
    }
    // No record: ADD writes one before it attaches anything and DEL removes
    // it last, so nothing is attached (a runtime's second DEL, or a DEL
    // after a failed ADD): nothing to do, said once.
    let path = call
        .cache
        .path(&req.conf.name, &req.container_id, &req.ifname);
    if !path.exists() {
        call.nothing = Some("already detached");
        return Ok(());
    }
    // A record that does not read: rebuild the list from the config (the
    // API's only from the local copy: DEL never waits for etcd) and release
    // what may be left, but never fail on it.
    warn!(record = %path.display(), "DEL: the record does not read; detaching from the config");
    if let Some(api) = &mut call.api {
        api.offline();
    }
    match call.plan(true) {
        Ok(delegates) => {
            for e in call.del_all(&delegates) {
                warn!(error = %e, "DEL without a readable record: ignored");
            }
        }
        Err(e) => warn!(error = %e, "DEL without a readable record: nothing to undo"),
    }
    call.cache
        .remove(&req.conf.name, &req.container_id, &req.ifname)
}

fn check(call: &mut Call<'_>, req: &Request) -> Result<(), Error> {
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
    call.planned(&record.delegates);
    if let Some(want) = &record.filter {
        let have = groups::listed(Path::new(&req.netns))?;
        // What ADD wrote, or what the agent wrote since (when it rewrote
        // the rules), as the kernel lists it.
        let agents: Option<Value> = std::fs::read(agent::filter_file(
            &call.node.cache_dir,
            &req.container_id,
            &req.ifname,
        ))
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok());
        let mut in_force = false;
        if let Some(have) = &have {
            for shape in std::iter::once(want).chain(agents.as_ref()) {
                let steps: Vec<groups::Step> =
                    serde_json::from_value(shape.clone()).map_err(|e| {
                        Error::new(
                            code::INTERNAL,
                            format!(
                                "the recorded security groups of {} do not parse: {e}",
                                req.container_id
                            ),
                        )
                    })?;
                if groups::normalized(&steps)? == *have {
                    in_force = true;
                    break;
                }
            }
        }
        if !in_force {
            let why = match &have {
                None => "its table is gone".to_string(),
                Some(_) => "a rule, chain or set differs from what ADD put there".to_string(),
            };
            return Err(Error::new(
                crate::sublink::DRIFT,
                format!(
                    "the security groups of {} ({}) are not in force: {why}",
                    req.container_id, req.ifname
                ),
            )
            .with_details(format!(
                "nftables table inet {} in {}",
                groups::TABLE,
                req.netns
            )));
        }
    }
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

fn gc(call: &mut Call<'_>, req: &Request) -> Result<(), Error> {
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
        let record = Record::of(&entry).unwrap_or_default();
        if valid.contains(&att) {
            still_valid.extend(record.delegates.iter().map(|d| Attachment {
                container_id: att.container_id.clone(),
                ifname: d.ifname.clone(),
            }));
            continue;
        }
        info!(stale = %att.container_id, ifname = %att.ifname, "GC: releasing stale attachment");
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
        let mut failed = Vec::new();
        if !del_req.netns.is_empty() && record.delegates.iter().any(|d| !d.groups.is_empty()) {
            if let Err(e) = groups::remove(Path::new(&del_req.netns)) {
                failed.push(e.context("security groups"));
            }
        }
        failed.extend(stale.del_all(&record.delegates));
        if failed.is_empty() {
            let _ = call
                .cache
                .remove(&req.conf.name, &att.container_id, &att.ifname);
        }
        errors.extend(failed);
    }
    // Delegates that speak GC themselves get the attachments still in use.
    let valid_list: Vec<Attachment> = still_valid.into_iter().collect();
    for list in all_lists(call) {
        if let Err(e) = call.exec.gc_list(&list, &valid_list) {
            errors.push(e.context(format!("network {:?}", list.name)));
        }
    }
    let journal = call.journal();
    let node = call.node.node_name.clone();
    if let Some(api) = &mut call.api {
        let containers: BTreeSet<String> = valid.iter().map(|a| a.container_id.clone()).collect();
        let swept = publisher::sweep(&call.node.cache_dir, &containers);
        if swept > 0 {
            info!(removed = swept, "GC: requests of publishers that are gone");
        }
        // Records are a view: a GC that cannot reach etcd still succeeds.
        let collected = attachments::node_name(node.as_deref()).and_then(|node| {
            attachments::collect(api, &journal, &node, &containers).map_err(Error::from)
        });
        match collected {
            Ok(n) => info!(removed = n, "GC: Attachment records"),
            Err(e) => warn!(error = %e, "GC: stale Attachment records not removed"),
        }
    }
    cni::error::combine(errors)
}

fn status(call: &mut Call<'_>, _req: &Request) -> Result<(), Error> {
    let unavailable = |e: Error| Error::new(code::PLUGIN_NOT_AVAILABLE, e.to_string());
    let mut dir = plan::Dir(&call.node);
    let source = Call::source(&mut call.api, &mut dir);
    let defs = source.load(Some(&[])).map_err(unavailable)?;
    for problem in defs.problems() {
        warn!(%problem, "network definition unusable");
    }
    // STATUS has no pod: a ClusterNetwork is usable when it allows any namespace.
    let namespace = match &call.node.cluster {
        node::ClusterNetwork::Named(name) => defs
            .iter()
            .find(|d| d.namespace.is_none() && &d.name == name)
            .and_then(|d| match &d.scope {
                conf::Scope::Allowed(allowed) => allowed.first().cloned(),
                _ => None,
            }),
        node::ClusterNetwork::Inline(_) => None,
    };
    let namespace = namespace.unwrap_or_else(|| "default".into());
    let (cluster, _) =
        plan::cluster_list(&call.node, source, &defs, &namespace).map_err(unavailable)?;
    for i in 0..cluster.plugins.len() {
        call.exec
            .find(cluster.plugin_type(i))
            .map_err(unavailable)?;
    }
    call.exec.status_list(&cluster)
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
    let ns = crate::kernel::netlink::Netns::open(Path::new(&req.netns))?;
    for (d, gw) in wanted {
        ns.replace_default_route(&d.ifname, gw)
            .map_err(|e| e.context(format!("network {:?} ({})", d.network, d.ifname)))?;
        debug!(network = %d.network, ifname = %d.ifname, %gw, "default route moved");
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
fn all_lists(call: &mut Call<'_>) -> Vec<NetConfList> {
    let mut dir = plan::Dir(&call.node);
    let source = Call::source(&mut call.api, &mut dir);
    let defs = source.load(None).unwrap_or_default();
    let mut lists: Vec<NetConfList> = Vec::new();
    if let Ok((c, _)) = plan::cluster_list(&call.node, source, &defs, "default") {
        lists.push(c);
    }
    for d in defs.iter() {
        if !lists.iter().any(|l| l == &d.list) {
            lists.push(d.list.clone());
        }
    }
    lists
}
