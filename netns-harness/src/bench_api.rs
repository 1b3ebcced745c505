//! `make bench`, central API part: `plexusd` GET and LIST throughput with 8
//! concurrent clients (each on one kept-alive TLS connection) against raw
//! etcd reads of the same keys by 8 clients on the same 3-member etcd, in the
//! same run.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use ipam::config::EtcdConf;
use ipam::{EtcdStore, Store};
use plexus_central::client::{Client, Method};
use serde_json::json;

use crate::etcd::{EtcdCluster, Tls};
use crate::plexusd::Plexusd;
use crate::scratch::Scratch;

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 250;
const OBJECTS: usize = 20;
const TOKEN: &str = "bench-admin-token";
const NAMESPACE: &str = "bench";

/// What one request does, for both sides.
#[derive(Clone, Copy)]
enum Op {
    Get,
    List,
}

/// Runs `work(i)` on `CLIENTS` threads released together; returns requests per second.
fn parallel<F>(work: F) -> Result<f64, String>
where
    F: Fn(usize) -> Result<Box<dyn FnMut(usize) -> Result<(), String>>, String>
        + Send
        + Sync
        + 'static,
{
    let work = Arc::new(work);
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (work, barrier) = (work.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let prepared = work(i);
                barrier.wait();
                let mut one = prepared?;
                for n in 0..PER_CLIENT {
                    one(n)?;
                }
                Ok(())
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        t.join()
            .map_err(|_| "bench thread panicked".to_string())??;
    }
    Ok((CLIENTS * PER_CLIENT) as f64 / start.elapsed().as_secs_f64())
}

fn nad_path(name: Option<&str>) -> String {
    let base =
        format!("/apis/k8s.cni.cncf.io/v1/namespaces/{NAMESPACE}/network-attachment-definitions");
    match name {
        Some(n) => format!("{base}/{n}"),
        None => base,
    }
}

fn via_plexusd(url: &str, ca: &std::path::Path, op: Op) -> Result<f64, String> {
    let (url, ca) = (url.to_string(), ca.to_path_buf());
    parallel(move |_| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let client = Client::new(&url, Some(TOKEN), Some(&ca)).map_err(|e| e.to_string())?;
        let mut session = rt.block_on(client.session()).map_err(|e| e.to_string())?;
        Ok(Box::new(move |n: usize| {
            let path = match op {
                Op::Get => nad_path(Some(&format!("net-{}", n % OBJECTS))),
                Op::List => nad_path(None),
            };
            let r = rt
                .block_on(session.send(Method::GET, &path, None))
                .map_err(|e| e.to_string())?;
            if r.status != 200 {
                return Err(format!("GET {path}: {}", r.status));
            }
            Ok(())
        }) as Box<dyn FnMut(usize) -> Result<(), String>>)
    })
}

fn via_etcd(endpoints: &[String], op: Op) -> Result<f64, String> {
    let endpoints = endpoints.to_vec();
    parallel(move |_| {
        let mut store = EtcdStore::connect(&EtcdConf::new(endpoints.clone(), "/"))
            .map_err(|e| e.to_string())?;
        let prefix = conf::api::NAD.prefix(Some(NAMESPACE));
        let prefix = prefix.trim_start_matches('/').to_string();
        Ok(Box::new(move |n: usize| {
            let found = match op {
                Op::Get => store
                    .get(&format!("{prefix}net-{}", n % OBJECTS))
                    .map_err(|e| e.to_string())?
                    .is_some(),
                Op::List => store.range(&prefix).map_err(|e| e.to_string())?.len() == OBJECTS,
            };
            if found {
                Ok(())
            } else {
                Err(format!("etcd read under {prefix} found nothing"))
            }
        }) as Box<dyn FnMut(usize) -> Result<(), String>>)
    })
}

/// The central API part of `make bench`.
pub fn run() -> Result<(), String> {
    let scratch = Scratch::new("bench-api").map_err(|e| e.to_string())?;
    let (server, _) = Tls::generate(scratch.path()).map_err(|e| format!("certificates: {e}"))?;
    let etcd = EtcdCluster::start(3).map_err(|e| format!("etcd: {e}"))?;
    let plexusd = Plexusd::start(
        &scratch,
        &etcd.endpoints(),
        &server,
        &[(TOKEN, "bench", &["plexus:admins"])],
        &[],
    )
    .map_err(|e| format!("plexusd: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client =
        Client::new(&plexusd.url(), Some(TOKEN), Some(&plexusd.ca)).map_err(|e| e.to_string())?;
    for i in 0..OBJECTS {
        let obj = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": format!("net-{i}"), "namespace": NAMESPACE},
            "spec": {"config": json!({"cniVersion": "1.0.0", "type": "plexus-macvlan",
                "master": "eth1", "ipam": {"type": "host-local", "subnet": "10.9.0.0/24"}}).to_string()}});
        let body = serde_json::to_vec(&obj).map_err(|e| e.to_string())?;
        let r = rt
            .block_on(client.send(
                Method::POST,
                &nad_path(None),
                Some(("application/json", body.into())),
            ))
            .map_err(|e| e.to_string())?;
        if r.status != 201 {
            return Err(format!("seed net-{i}: {}", r.status));
        }
    }
    println!(
        "\nCentral API: plexusd (TLS, one kept-alive connection per client) against raw etcd \
         reads of the same keys (gRPC), {CLIENTS} concurrent clients, {PER_CLIENT} requests each, \
         {OBJECTS} objects, 3-member etcd, same run"
    );
    println!(
        "{:>6}  {:>12}  {:>12}  {:>6}",
        "op", "plexusd /s", "etcd /s", "ratio"
    );
    let mut ratios = Vec::new();
    for (label, op) in [("GET", Op::Get), ("LIST", Op::List)] {
        // etcd before and after, averaged, so both sides see the same load.
        let before = via_etcd(&etcd.endpoints(), op)?;
        let api = via_plexusd(&plexusd.url(), &plexusd.ca, op)?;
        let after = via_etcd(&etcd.endpoints(), op)?;
        let raw = (before + after) / 2.0;
        let ratio = api / raw;
        println!("{label:>6}  {api:>12.0}  {raw:>12.0}  {ratio:>6.3}");
        ratios.push((label, ratio));
    }
    for (label, ratio) in ratios {
        crate::bench::verdict(
            &format!("plexusd {label} throughput / raw etcd read, 8 clients"),
            ratio,
            0.5,
            true,
        );
    }
    Ok(())
}
