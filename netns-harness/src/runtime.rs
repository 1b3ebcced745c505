//! A container runtime as seen by a plugin: libcni's invocation rules
//! (capability injection, `prevResult` chaining, DEL in reverse with the cached
//! result, CHECK against the cache) and containerd's habits (`CNI_ARGS`, the
//! pod-annotations capability, `null` for a pod without annotations).

use std::collections::BTreeMap;
use std::path::Path;

use cni::cache::{Cache, CacheEntry};
use cni::config::Attachment;
use cni::exec::{Executor, Invocation};
use cni::plugin::Command;
use cni::{Error, NetConfList, Version};
use serde_json::{Map, Value};

use crate::netns::Netns;

/// One pod sandbox as the runtime describes it to plugins.
#[derive(Debug, Clone)]
pub struct Pod {
    pub container_id: String,
    /// `CNI_NETNS`; empty for the runtime's second DEL after the sandbox is gone.
    pub netns: String,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    /// Capability arguments the runtime offers (libcni's `CapabilityArgs`).
    pub caps: Map<String, Value>,
}

impl Pod {
    /// A pod in `netns` with containerd's `CNI_ARGS` and no annotations.
    pub fn new(container_id: &str, netns: &Netns, namespace: &str) -> Pod {
        let mut caps = Map::new();
        caps.insert("io.kubernetes.cri.pod-annotations".into(), Value::Null);
        Pod {
            container_id: container_id.to_string(),
            netns: netns.path_str(),
            ifname: "eth0".into(),
            namespace: namespace.to_string(),
            name: format!("pod-{container_id}"),
            caps,
        }
    }

    /// Sets the pod's annotations (strings only, as Kubernetes has them).
    pub fn annotate(mut self, annotations: &[(&str, &str)]) -> Pod {
        let map: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        self.caps.insert(
            "io.kubernetes.cri.pod-annotations".into(),
            serde_json::to_value(map).unwrap_or(Value::Null),
        );
        self
    }

    /// Asks for secondary networks through `k8s.v1.cni.cncf.io/networks`.
    pub fn networks(self, annotation: &str) -> Pod {
        self.annotate(&[("k8s.v1.cni.cncf.io/networks", annotation)])
    }

    /// `CNI_ARGS` as containerd builds it.
    pub fn cni_args(&self) -> String {
        format!(
            "K8S_POD_INFRA_CONTAINER_ID={};IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_UID=uid-{};K8S_POD_NAME={}",
            self.container_id, self.namespace, self.container_id, self.name
        )
    }

    fn invocation(&self) -> Invocation {
        Invocation {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            args: self.cni_args(),
        }
    }
}

/// The runtime: a `CNI_PATH`, a result cache, and the node netns plugins run in.
#[derive(Debug, Clone)]
pub struct Runtime {
    exec: Executor,
    cache: Cache,
}

impl Runtime {
    /// Plugins from `bin_dir`, results cached under `cache_dir`, run in `node`
    /// (the test's stand-in for the host netns).
    pub fn new(bin_dir: &Path, cache_dir: &Path, node: &Netns) -> std::io::Result<Runtime> {
        let exec = Executor::new(bin_dir.display().to_string()).with_hook(node.enter_hook()?);
        Ok(Runtime {
            exec,
            cache: Cache::new(cache_dir),
        })
    }

    /// The same runtime, its plugins run in `node` with `env` added to
    /// their environment (a test's knobs, such as crash points).
    pub fn with_env(&self, node: &Netns, env: &[(&str, &str)]) -> std::io::Result<Runtime> {
        let enter = node.enter_hook()?;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let hook: cni::exec::Hook = std::sync::Arc::new(move |cmd: &mut std::process::Command| {
            enter(cmd);
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
        });
        Ok(Runtime {
            exec: self.exec.clone().with_hook(hook),
            cache: self.cache.clone(),
        })
    }

    /// The executor (for single-plugin calls).
    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// The result libcni would have cached for this pod.
    pub fn cached(&self, list: &NetConfList, pod: &Pod) -> Option<CacheEntry> {
        self.cache.get(&list.name, &pod.container_id, &pod.ifname)
    }

    /// ADD of a network list; caches the result as libcni does.
    pub fn add(&self, list: &NetConfList, pod: &Pod) -> Result<Value, Error> {
        let result = self.exec.add_list(list, &pod.invocation(), &pod.caps)?;
        let config = serde_json::to_vec(list).unwrap_or_default();
        let mut entry = CacheEntry::new(&list.name, &pod.container_id, &pod.ifname, &config);
        entry.netns = pod.netns.clone();
        entry.capability_args = pod.caps.clone();
        entry.result = Some(result.clone());
        self.cache.put(&entry)?;
        Ok(result)
    }

    /// DEL of a network list, in reverse, with the cached result as
    /// `prevResult` from 0.4.0 on; drops the cache entry.
    pub fn del(&self, list: &NetConfList, pod: &Pod) -> Result<(), Error> {
        let cached = self.cached(list, pod).and_then(|e| e.result);
        let prev = cached.filter(|_| list.version() >= Version::V0_4_0);
        self.exec
            .del_list(list, &pod.invocation(), &pod.caps, prev.as_ref())?;
        self.cache
            .remove(&list.name, &pod.container_id, &pod.ifname)
    }

    /// DEL as containerd sends it the second time: no netns, no `prevResult`.
    pub fn del_without_netns(&self, list: &NetConfList, pod: &Pod) -> Result<(), Error> {
        let bare = Pod {
            netns: String::new(),
            ..pod.clone()
        };
        self.exec
            .del_list(list, &bare.invocation(), &bare.caps, None)?;
        self.cache
            .remove(&list.name, &pod.container_id, &pod.ifname)
    }

    /// CHECK of a network list against the cached result.
    pub fn check(&self, list: &NetConfList, pod: &Pod) -> Result<(), Error> {
        let cached = self
            .cached(list, pod)
            .and_then(|e| e.result)
            .ok_or_else(|| {
                Error::new(cni::code::UNKNOWN_CONTAINER, "no cached result for CHECK")
            })?;
        self.exec
            .check_list(list, &pod.invocation(), &pod.caps, &cached)
    }

    /// GC of a network list, keeping `valid`.
    pub fn gc(&self, list: &NetConfList, valid: &[Attachment]) -> Result<(), Error> {
        self.exec.gc_list(list, valid)
    }

    /// STATUS of a network list.
    pub fn status(&self, list: &NetConfList) -> Result<(), Error> {
        self.exec.status_list(list)
    }

    /// One raw plugin call: `stdin` as given, environment from `pod` (or none).
    pub fn raw(
        &self,
        plugin: &str,
        command: Command,
        pod: Option<&Pod>,
        stdin: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let inv = pod.map(Pod::invocation).unwrap_or_default();
        self.exec.exec(plugin, command, &inv, stdin)
    }
}
