//! Cluster-wide dual-stack IPAM: pools, blocks with node affinity, handles,
//! behind an etcd store and a local file store. Not built yet: see the IPAM
//! issue; until then `host-local` or any other IPAM plugin is used by type.
