//! `plexus-userspace`: a vhost-user port on the node's OVS-DPDK bridge for a
//! pod whose application runs DPDK (no kernel interface). It takes the
//! config users of Intel's userspace CNI write (`host`, `container`,
//! `ipam`) and talks to `ovsdb-server` itself, one transaction per change.
//!
//! Per pod, a directory `<socketDir>/<container id, 12 characters>/` holds
//! for each interface the vhost-user socket `<ifname>.sock` and the
//! description `<ifname>.json`, which the pod's application reads (the
//! pod mounts `socketDir`; `<socketDir>/by-pod/<namespace>/<pod>` links to
//! its own directory). Host mode `client` (the default) is OVS's
//! `dpdkvhostuserclient`: the pod's application creates the socket as the
//! vhost-user server. Host mode `server` is `dpdkvhostuser`: OVS creates
//! the socket in its run directory, and it is linked into the pod's.
//!
//! Every port Plexus makes carries `external_ids:plexus-container`,
//! `plexus-ifname` and `plexus-network`; DEL and GC remove only those.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cni::args::CniArgs;
use cni::plugin::{Plugin, Request};
use cni::result::Interface;
use cni::{code, CniResult, Error};
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::ipam_call::Ipam;
use crate::kernel::ovsdb::{self, Failure, Ovsdb};

pub struct Userspace;

/// The longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

struct Conf {
    /// Host `vhost.mode` is `client`: OVS connects to the pod's socket.
    ovs_is_client: bool,
    bridge: String,
    ovsdb: PathBuf,
    socket_dir: PathBuf,
    /// Where OVS makes `dpdkvhostuser` sockets (server mode).
    ovs_run_dir: PathBuf,
    timeout: Duration,
    mac: Option<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

fn str_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

impl Conf {
    fn parse(req: &Request) -> Result<Conf, Error> {
        let extra = Value::Object(req.conf.extra.clone().into_iter().collect());
        let engine = str_at(&extra, "/host/engine").unwrap_or("ovs-dpdk");
        if engine != "ovs-dpdk" {
            return Err(invalid(format!(
                "host.engine {engine:?} is not supported: plexus-userspace drives ovs-dpdk (OVS with DPDK); vpp is not"
            )));
        }
        let iftype = str_at(&extra, "/host/iftype").unwrap_or("vhostuser");
        if iftype != "vhostuser" {
            return Err(invalid(format!(
                "host.iftype {iftype:?} is not supported: plexus-userspace makes vhostuser ports (memif is VPP's)"
            )));
        }
        let net_type = str_at(&extra, "/host/netType").unwrap_or("bridge");
        if net_type != "bridge" {
            return Err(invalid(format!(
                "host.netType {net_type:?} is not supported: ports go on a bridge"
            )));
        }
        let mode = str_at(&extra, "/host/vhost/mode").unwrap_or("client");
        let ovs_is_client = match mode {
            "client" => true,
            "server" => false,
            other => {
                return Err(invalid(format!(
                    "host.vhost.mode {other:?} is not client or server"
                )))
            }
        };
        if let Some(c) = str_at(&extra, "/container/engine") {
            if c != engine {
                return Err(invalid(format!(
                    "container.engine {c:?} differs from host.engine {engine:?}"
                )));
            }
        }
        if let Some(c) = str_at(&extra, "/container/iftype") {
            if c != iftype {
                return Err(invalid(format!(
                    "container.iftype {c:?} differs from host.iftype {iftype:?}"
                )));
            }
        }
        if let Some(c) = str_at(&extra, "/container/vhost/mode") {
            if c == mode {
                return Err(invalid(format!(
                    "container.vhost.mode {c:?} is host.vhost.mode too: one side is the vhost-user client, the other the server"
                )));
            }
        }
        let bridge = str_at(&extra, "/host/bridge/bridgeName")
            .unwrap_or("br0")
            .to_string();
        let ovsdb = ovsdb::socket_path(str_at(&extra, "/ovsdbSocket"));
        let ovs_run_dir = match str_at(&extra, "/ovsRunDir") {
            Some(d) => PathBuf::from(d),
            None => std::env::var_os("OVS_RUNDIR")
                .map(PathBuf::from)
                .or_else(|| ovsdb.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("/var/run/openvswitch")),
        };
        let socket_dir = PathBuf::from(str_at(&extra, "/socketDir").unwrap_or("/run/plexus/vhost"));
        let timeout = Duration::from_secs(
            extra
                .get("timeoutSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(5)
                .clamp(1, 60),
        );
        let mac = req
            .conf
            .runtime_config
            .as_ref()
            .and_then(|rt| rt.mac.clone())
            .or_else(|| str_at(&extra, "/mac").map(String::from));
        if let Some(m) = &mac {
            crate::sublink::parse_mac(m)?;
        }
        Ok(Conf {
            ovs_is_client,
            bridge,
            ovsdb,
            socket_dir,
            ovs_run_dir,
            timeout,
            mac,
        })
    }

    fn connect(&self) -> Result<Ovsdb, Error> {
        Ovsdb::connect(&self.ovsdb, self.timeout).map_err(ovs_error)
    }
}

fn ovs_error(f: Failure) -> Error {
    match f {
        Failure::Unreachable(m) => Error::new(code::TRY_AGAIN_LATER, m).with_details(
            "is ovsdb-server running? (ovsdbSocket, $OVS_RUNDIR, /var/run/openvswitch/db.sock)",
        ),
        Failure::Refused(m) => Error::new(code::INTERNAL, m),
    }
}

/// A short stable hash, for names.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What one attachment is called on the node.
struct Names {
    /// The OVS port and interface (15 characters).
    port: String,
    pod_dir: PathBuf,
    socket: PathBuf,
    description: PathBuf,
}

fn names(req: &Request, conf: &Conf) -> Result<Names, Error> {
    let short: String = req
        .container_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(12)
        .collect();
    if short.is_empty() || short.starts_with('.') {
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            format!(
                "CNI_CONTAINERID {:?} cannot name a directory",
                req.container_id
            ),
        ));
    }
    let pod_dir = conf.socket_dir.join(short);
    let socket = pod_dir.join(format!("{}.sock", req.ifname));
    let len = socket.as_os_str().len();
    if len > SOCKET_PATH_MAX {
        return Err(invalid(format!(
            "the vhost-user socket {} would be {len} bytes, and a unix socket path holds {SOCKET_PATH_MAX}: choose a shorter socketDir",
            socket.display()
        )));
    }
    Ok(Names {
        port: format!(
            "vhu{:012x}",
            fnv(&format!("{}/{}", req.container_id, req.ifname)) & 0xffff_ffff_ffff
        ),
        description: pod_dir.join(format!("{}.json", req.ifname)),
        socket,
        pod_dir,
    })
}

/// The pod side's MAC: the requested one, else a locally administered one
/// derived from the attachment.
fn mac_of(req: &Request, conf: &Conf) -> String {
    if let Some(m) = &conf.mac {
        return m.to_lowercase();
    }
    let h = fnv(&format!("mac/{}/{}", req.container_id, req.ifname)).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

/// The condition matching the ports Plexus made for this attachment.
fn ours(req: &Request) -> Value {
    json!([[
        "external_ids",
        "includes",
        ovsdb::to_map(&[
            ("plexus-container", &req.container_id),
            ("plexus-ifname", &req.ifname),
        ])
    ]])
}

/// This attachment's OVS interface, if there is one: its name.
fn find_port(ovs: &mut Ovsdb, req: &Request) -> Result<Option<String>, Error> {
    let rows = ovs
        .select("Interface", ours(req), &["name"])
        .map_err(ovs_error)?;
    Ok(rows
        .first()
        .and_then(|r| r["name"].as_str())
        .map(String::from))
}

/// What ADD needs to know before it changes anything, read in one
/// round trip.
struct Survey {
    initialized: bool,
    /// This attachment's port, if it has one.
    existing: Option<String>,
    /// The bridge: its row's UUID and datapath type, if it exists.
    bridge: Option<(String, String)>,
}

fn survey(ovs: &mut Ovsdb, req: &Request, conf: &Conf) -> Result<Survey, Error> {
    let results = ovs
        .transact(vec![
            json!({"op": "select", "table": ovsdb::DB, "where": [], "columns": ["dpdk_initialized"]}),
            json!({"op": "select", "table": "Interface", "where": ours(req), "columns": ["name"]}),
            json!({"op": "select", "table": "Bridge", "where": [["name", "==", conf.bridge]],
                   "columns": ["_uuid", "datapath_type"]}),
        ])
        .map_err(ovs_error)?;
    let first = |i: usize| {
        results
            .get(i)
            .map(|r| r["rows"][0].clone())
            .unwrap_or_default()
    };
    let bridge = first(2);
    Ok(Survey {
        initialized: first(0)["dpdk_initialized"].as_bool().unwrap_or(false),
        existing: first(1)["name"].as_str().map(String::from),
        bridge: bridge["_uuid"][1].as_str().map(|u| {
            (
                u.to_string(),
                bridge["datapath_type"].as_str().unwrap_or("").to_string(),
            )
        }),
    })
}

/// The switch is ready for vhost-user ports: DPDK initialized.
fn not_initialized(initialized: bool, conf: &Conf) -> Result<(), Error> {
    if !initialized {
        return Err(Error::new(
            code::TRY_AGAIN_LATER,
            format!(
                "ovs-vswitchd behind {} is not DPDK-initialized: vhost-user ports need other_config:dpdk-init=true and huge pages",
                conf.ovsdb.display()
            ),
        )
        .with_details("see the README's \"User-space networking\" for what a node needs"));
    }
    Ok(())
}

/// Removes the port named `port` from every bridge.
fn remove_port(ovs: &mut Ovsdb, port: &str) -> Result<(), Error> {
    let rows = ovs
        .select("Port", json!([["name", "==", port]]), &["_uuid"])
        .map_err(ovs_error)?;
    match rows.first().and_then(|r| r["_uuid"][1].as_str()) {
        Some(uuid) => unplug_port(ovs, uuid),
        None => Ok(()),
    }
}

/// Takes the Port row `uuid` off every bridge (the database then drops it
/// and its Interface). Committed, the port is gone for every reader of the
/// database; `ovs-vswitchd` lets go of it on its own time (some 8 ms here),
/// and nothing waits for that: an ADD after it waits for the switch to have
/// applied every change up to its own, this one included.
fn unplug_port(ovs: &mut Ovsdb, uuid: &str) -> Result<(), Error> {
    ovs.transact(vec![
        json!({"op": "mutate", "table": "Bridge", "where": [],
               "mutations": [["ports", "delete", ["uuid", uuid]]]}),
        json!({"op": "mutate", "table": ovsdb::DB, "where": [],
               "mutations": [["next_cfg", "+=", 1]]}),
    ])
    .map(|_| ())
    .map_err(ovs_error)
}

/// Removes the pod's files of this attachment (and its directory once empty).
fn remove_files(req: &Request, conf: &Conf, n: &Names) {
    for f in [&n.socket, &n.description] {
        if let Err(e) = std::fs::remove_file(f) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(file = %f.display(), error = %e, "not removed");
            }
        }
    }
    if std::fs::remove_dir(&n.pod_dir).is_ok() {
        if let Some(link) = by_pod(req, conf) {
            if std::fs::read_link(&link).ok().as_deref() == Some(&relative_target(n)) {
                let _ = std::fs::remove_file(&link);
                if let Some(parent) = link.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
    }
}

/// GC of what a port no longer names: the files of this network's
/// attachments the runtime no longer has (their description says whose they
/// are; a DEL killed between the port and the files leaves them), and
/// `by-pod` links to a directory that is gone.
fn gc_files(req: &Request, conf: &Conf, valid: &std::collections::HashSet<(String, String)>) {
    let Ok(dirs) = std::fs::read_dir(&conf.socket_dir) else {
        return;
    };
    for dir in dirs.flatten() {
        if dir.file_name() == "by-pod" {
            continue;
        }
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(desc) = std::fs::read(&path)
                .ok()
                .and_then(|raw| serde_json::from_slice::<Value>(&raw).ok())
            else {
                continue;
            };
            let (Some(container), Some(ifname), Some(network)) = (
                desc["containerId"].as_str(),
                desc["ifName"].as_str(),
                desc["name"].as_str(),
            ) else {
                continue;
            };
            let pair = (container.to_string(), ifname.to_string());
            if network != req.conf.name || valid.contains(&pair) {
                continue;
            }
            let stale = Request {
                container_id: pair.0,
                ifname: pair.1,
                ..req.clone()
            };
            if let Some(n) = names(&stale, conf).ok().filter(|n| n.pod_dir == dir.path()) {
                debug!(dir = %n.pod_dir.display(), container = %stale.container_id, "GC: stale vhost-user files");
                remove_files(&stale, conf, &n);
            }
        }
    }
    let by_pod = conf.socket_dir.join("by-pod");
    for ns in std::fs::read_dir(&by_pod).into_iter().flatten().flatten() {
        for link in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let path = link.path();
            let dangling = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| m.file_type().is_symlink())
                && std::fs::metadata(&path).is_err();
            if dangling {
                let _ = std::fs::remove_file(&path);
            }
        }
        let _ = std::fs::remove_dir(ns.path());
    }
}

/// `<socketDir>/by-pod/<namespace>/<pod>`, when the runtime names the pod.
fn by_pod(req: &Request, conf: &Conf) -> Option<PathBuf> {
    let args = CniArgs::parse(&req.args).ok()?;
    let ns = args.get("K8S_POD_NAMESPACE").filter(|s| !s.is_empty())?;
    let pod = args.get("K8S_POD_NAME").filter(|s| !s.is_empty())?;
    let safe = |s: &str| !s.contains('/') && s != "." && s != "..";
    (safe(ns) && safe(pod)).then(|| conf.socket_dir.join("by-pod").join(ns).join(pod))
}

fn relative_target(n: &Names) -> PathBuf {
    Path::new("../..").join(n.pod_dir.file_name().unwrap_or_default())
}

/// Waits for `path` to exist (a socket OVS creates).
fn wait_for(path: &Path, until: Instant) -> bool {
    while Instant::now() < until {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    path.exists()
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(code::IO_FAILURE, format!("{what} {}: {e}", path.display()))
}

impl Userspace {
    /// The port on the bridge (made when missing) and its socket in the
    /// pod's directory; nothing here needs the pod's addresses, so IPAM
    /// runs meanwhile.
    fn plug(
        &self,
        req: &Request,
        conf: &Conf,
        n: &Names,
        ovs: &mut Ovsdb,
        bridge: Option<&str>,
    ) -> Result<(), Error> {
        std::fs::create_dir_all(&n.pod_dir)
            .map_err(|e| io_error("cannot create", &n.pod_dir, e))?;
        let mut ops = Vec::new();
        let bridge_ref = match bridge {
            Some(uuid) => json!(["uuid", uuid]),
            None => {
                // Made as ovs-vsctl add-br would, marked as Plexus'.
                let marks = ovsdb::to_map(&[("plexus-created", "true")]);
                ops.push(
                    json!({"op": "insert", "table": "Interface", "uuid-name": "brif",
                    "row": {"name": conf.bridge, "type": "internal"}}),
                );
                ops.push(
                    json!({"op": "insert", "table": "Port", "uuid-name": "brport",
                    "row": {"name": conf.bridge, "interfaces": ["named-uuid", "brif"]}}),
                );
                ops.push(json!({"op": "insert", "table": "Bridge", "uuid-name": "br",
                    "row": {"name": conf.bridge, "datapath_type": "netdev",
                            "ports": ["named-uuid", "brport"], "external_ids": marks}}));
                ops.push(json!({"op": "mutate", "table": ovsdb::DB, "where": [],
                    "mutations": [["bridges", "insert", ["set", [["named-uuid", "br"]]]]]}));
                json!(["named-uuid", "br"])
            }
        };
        let socket = n.socket.display().to_string();
        let (kind, options) = if conf.ovs_is_client {
            (
                "dpdkvhostuserclient",
                ovsdb::to_map(&[("vhost-server-path", &socket)]),
            )
        } else {
            ("dpdkvhostuser", ovsdb::to_map(&[]))
        };
        let marks = ovsdb::to_map(&[
            ("plexus-container", &req.container_id),
            ("plexus-ifname", &req.ifname),
            ("plexus-network", &req.conf.name),
            ("plexus-socket", &socket),
        ]);
        ops.push(
            json!({"op": "insert", "table": "Interface", "uuid-name": "vif",
            "row": {"name": n.port, "type": kind, "options": options, "external_ids": marks}}),
        );
        ops.push(
            json!({"op": "insert", "table": "Port", "uuid-name": "vport",
            "row": {"name": n.port, "interfaces": ["named-uuid", "vif"], "external_ids": marks}}),
        );
        let bridge_cond = match bridge_ref.get(0).and_then(Value::as_str) {
            Some("uuid") => json!([["_uuid", "==", bridge_ref]]),
            _ => json!([["name", "==", conf.bridge]]),
        };
        ops.push(
            json!({"op": "mutate", "table": "Bridge", "where": bridge_cond,
            "mutations": [["ports", "insert", ["set", [["named-uuid", "vport"]]]]]}),
        );
        ops.push(json!({"op": "mutate", "table": ovsdb::DB, "where": [],
            "mutations": [["next_cfg", "+=", 1]]}));
        ops.push(json!({"op": "select", "table": ovsdb::DB, "where": [], "columns": ["next_cfg"]}));
        let results = ovs.transact(ops).map_err(ovs_error)?;
        crate::crash::point("userspace.port-added");
        let cfg = results
            .last()
            .and_then(|r| r["rows"][0]["next_cfg"].as_i64())
            .unwrap_or(0);
        ovs.wait_applied(cfg).map_err(ovs_error)?;
        let rows = ovs
            .select(
                "Interface",
                json!([["name", "==", n.port]]),
                &["error", "ofport"],
            )
            .map_err(ovs_error)?;
        if let Some(err) = rows.first().and_then(|r| r["error"].as_str()) {
            return Err(Error::new(
                code::INTERNAL,
                format!(
                    "ovs-vswitchd refused port {} on bridge {}: {err}",
                    n.port, conf.bridge
                ),
            ));
        }
        if !conf.ovs_is_client {
            // OVS made the socket in its run directory: the pod's directory
            // gets it too (a hard link: the same socket).
            let made = conf.ovs_run_dir.join(&n.port);
            if !wait_for(&made, Instant::now() + conf.timeout) {
                return Err(Error::new(
                    code::INTERNAL,
                    format!(
                        "ovs-vswitchd made no socket {} for port {}",
                        made.display(),
                        n.port
                    ),
                )
                .with_details("ovsRunDir must be the vhost-sock-dir of ovs-vswitchd"));
            }
            let _ = std::fs::remove_file(&n.socket);
            std::fs::hard_link(&made, &n.socket).map_err(|e| {
                io_error(&format!("cannot link {} as", made.display()), &n.socket, e)
            })?;
        }
        crate::crash::point("userspace.plugged");
        debug!(port = %n.port, bridge = %conf.bridge, socket = %socket, "vhost-user port attached");
        Ok(())
    }

    /// The result, and the description the pod's application reads.
    fn describe(
        &self,
        req: &Request,
        conf: &Conf,
        n: &Names,
        ipam: &CniResult,
    ) -> Result<CniResult, Error> {
        let socket = n.socket.display().to_string();
        let mac = mac_of(req, conf);
        let mut result = CniResult {
            interfaces: vec![Interface {
                name: req.ifname.clone(),
                mac: Some(mac.clone()),
                sandbox: Some(req.netns.clone()),
                socket_path: Some(socket.clone()),
                ..Default::default()
            }],
            ips: ipam.ips.clone(),
            routes: ipam.routes.clone(),
            dns: ipam.dns.clone(),
        };
        for ip in &mut result.ips {
            ip.interface = Some(0);
        }
        // What the pod's application reads: userspace CNI's configuration
        // data for the interface, and where its socket is.
        let container_mode = if conf.ovs_is_client {
            "server"
        } else {
            "client"
        };
        let description = json!({
            "containerId": req.container_id,
            "ifName": req.ifname,
            "name": req.conf.name,
            "config": {
                "engine": "ovs-dpdk",
                "iftype": "vhostuser",
                "netType": "interface",
                "vhost": {"mode": container_mode},
                "bridge": {"bridgeName": conf.bridge},
            },
            "socketFile": format!("{}.sock", req.ifname),
            "hostSocketPath": socket,
            "mac": mac,
            "port": n.port,
            "ipResult": result.to_json(cni::Version::LATEST),
        });
        let raw = serde_json::to_vec_pretty(&description)
            .map_err(|e| Error::new(code::INTERNAL, e.to_string()))?;
        std::fs::write(&n.description, raw)
            .map_err(|e| io_error("cannot write", &n.description, e))?;
        crate::crash::point("userspace.described");
        if let Some(link) = by_pod(req, conf) {
            if let Some(parent) = link.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::remove_file(&link);
            if let Err(e) = std::os::unix::fs::symlink(relative_target(n), &link) {
                warn!(link = %link.display(), error = %e, "by-pod link not made");
            }
        }
        Ok(result)
    }
}

impl Plugin for Userspace {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let conf = Conf::parse(req)?;
        let n = names(req, &conf)?;
        let mut ovs = conf.connect()?;
        let survey = survey(&mut ovs, req, &conf)?;
        not_initialized(survey.initialized, &conf)?;
        if let Some((_, dp)) = &survey.bridge {
            if dp != "netdev" {
                return Err(invalid(format!(
                    "bridge {} has datapath_type {dp:?}: vhost-user ports need a user-space bridge (datapath_type=netdev)",
                    conf.bridge
                )));
            }
        }
        let bridge = survey.bridge.as_ref().map(|(uuid, _)| uuid.as_str());
        if let Some(port) = survey.existing {
            return Err(Error::new(
                code::INVALID_ENVIRONMENT,
                format!(
                    "{} ({}) already has vhost-user port {port}",
                    req.container_id, req.ifname
                ),
            ));
        }
        let ipam = Ipam::of(req)?;
        let (plugged, addresses) = match &ipam {
            Some(i) => i.add_beside(|| self.plug(req, &conf, &n, &mut ovs, bridge)),
            None => (
                self.plug(req, &conf, &n, &mut ovs, bridge),
                Ok(CniResult::default()),
            ),
        };
        let released = addresses.is_err();
        plugged
            .and(addresses)
            .and_then(|addresses| self.describe(req, &conf, &n, &addresses))
            .inspect_err(|_| {
                if let Err(e) = remove_port(&mut ovs, &n.port) {
                    warn!(error = %e, "port left after a failed ADD");
                }
                remove_files(req, &conf, &n);
                if let (Some(i), false) = (&ipam, released) {
                    if let Err(e) = i.del() {
                        warn!(error = %e, "IPAM release after a failed ADD");
                    }
                }
            })
    }

    /// Port, files, addresses; with `ovsdb-server` down it fails and keeps
    /// everything (the runtime retries).
    fn del(&self, req: &Request) -> Result<(), Error> {
        let conf = Conf::parse(req)?;
        let n = names(req, &conf)?;
        let mut ovs = conf.connect()?;
        let mut unplug = || -> Result<(), Error> {
            // The Port row carries the attachment's marks too: one read.
            let rows = ovs
                .select("Port", ours(req), &["_uuid"])
                .map_err(ovs_error)?;
            if let Some(uuid) = rows.first().and_then(|r| r["_uuid"][1].as_str()) {
                unplug_port(&mut ovs, uuid)?;
                crate::crash::point("userspace.port-removed");
            }
            remove_files(req, &conf, &n);
            crate::crash::point("userspace.files-removed");
            Ok(())
        };
        // The port and the address go together (ovsdb-server answered just
        // now); each keeps its own error.
        let (unplugged, released) = match Ipam::of(req)? {
            Some(i) => i.del_beside(unplug),
            None => (unplug(), Ok(())),
        };
        unplugged.and(released)
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let conf = Conf::parse(req)?;
        let n = names(req, &conf)?;
        let mut ovs = conf.connect()?;
        let drift =
            |what: String| Error::new(crate::sublink::DRIFT, format!("plexus-userspace: {what}"));
        let Some(port) = find_port(&mut ovs, req)? else {
            return Err(drift(format!(
                "the vhost-user port of {} ({}) is missing from OVS",
                req.container_id, req.ifname
            )));
        };
        let in_bridge = ovs
            .select("Bridge", json!([["name", "==", conf.bridge]]), &["ports"])
            .map_err(ovs_error)?;
        let port_uuid = ovs
            .select("Port", json!([["name", "==", port]]), &["_uuid"])
            .map_err(ovs_error)?
            .first()
            .and_then(|r| r["_uuid"][1].as_str().map(String::from));
        let attached = in_bridge
            .first()
            .is_some_and(|b| port_uuid.is_some_and(|u| ovsdb::uuids(&b["ports"]).contains(&u)));
        if !attached {
            return Err(drift(format!(
                "port {port} is not on bridge {}",
                conf.bridge
            )));
        }
        if !conf.ovs_is_client && !n.socket.exists() {
            return Err(drift(format!("socket {} is missing", n.socket.display())));
        }
        if !n.description.exists() {
            return Err(drift(format!("{} is missing", n.description.display())));
        }
        if let Some(ipam) = Ipam::of(req)? {
            ipam.check()?;
        }
        Ok(())
    }

    /// Removes the ports Plexus made on this network for attachments the
    /// runtime no longer has; never a port without Plexus' marks.
    fn gc(&self, req: &Request) -> Result<(), Error> {
        let conf = Conf::parse(req)?;
        let valid = req.conf.valid_pairs();
        let mut ovs = conf.connect()?;
        let rows = ovs
            .select(
                "Interface",
                json!([[
                    "external_ids",
                    "includes",
                    ovsdb::to_map(&[("plexus-network", &req.conf.name)])
                ]]),
                &["name", "external_ids"],
            )
            .map_err(ovs_error)?;
        for row in rows {
            let ids = ovsdb::map(&row["external_ids"]);
            let get = |k: &str| ids.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let (Some(container), Some(ifname), Some(port)) = (
                get("plexus-container"),
                get("plexus-ifname"),
                row["name"].as_str().map(String::from),
            ) else {
                continue;
            };
            if valid.contains(&(container.clone(), ifname.clone())) {
                continue;
            }
            debug!(port = %port, container = %container, "GC: stale vhost-user port");
            remove_port(&mut ovs, &port)?;
            let stale = Request {
                container_id: container,
                ifname,
                ..req.clone()
            };
            if let Ok(n) = names(&stale, &conf) {
                remove_files(&stale, &conf, &n);
            }
        }
        gc_files(req, &conf, &valid);
        match Ipam::of(req)? {
            Some(ipam) => ipam.gc(),
            None => Ok(()),
        }
    }

    fn status(&self, req: &Request) -> Result<(), Error> {
        let conf = Conf::parse(req)?;
        let mut ovs = conf
            .connect()
            .map_err(|e| Error::new(code::PLUGIN_NOT_AVAILABLE, e.msg))?;
        survey(&mut ovs, req, &conf)
            .and_then(|s| not_initialized(s.initialized, &conf))
            .map_err(|e| Error::new(code::PLUGIN_NOT_AVAILABLE, e.msg))
    }
}
