//! The kubelet stand-in for tests and the demo: named network namespaces, a
//! runtime that invokes plugins exactly as libcni does, kernel-state readers,
//! connectivity probes, and fixtures for real components (etcd, OVS-DPDK,
//! containerd with a CRI client, the VM's SR-IOV NIC).

pub mod bench;
pub mod bench_api;
pub mod bench_burst;
pub mod bench_groups;
pub mod bench_ipam;
pub mod bench_nodeapi;
pub mod bench_scale;
pub mod bench_sriov;
pub mod bench_stack;
pub mod bench_userspace;
pub mod containerd;
pub mod demo;
pub mod etcd;
pub mod fixtures;
pub mod grpc;
pub mod kernel;
pub mod kubelet;
pub mod netns;
pub mod node;
pub mod ovs;
pub mod plexusd;
pub mod probe;
pub mod relay;
pub mod runtime;
pub mod scratch;
pub mod soak;
pub mod sriov;
pub mod vm;

pub use netns::Netns;
pub use runtime::{Pod, Runtime};
pub use scratch::Scratch;
