//! What `plexus-sriov` changed on a VF, kept per VF (`<stateDir>/<PCI
//! address>.json`) before it changes anything, so DEL and GC put back
//! exactly that, whatever became of the pod. The directory's `lock` is held
//! (`flock`) for a whole ADD, DEL or GC: a VF is claimed by one pod at a time.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use cni::{code, Error};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::kernel::netlink::VfSetting;

/// The VF's netdev as it was in the host before ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netdev {
    pub name: String,
    pub mac: Vec<u8>,
    pub up: bool,
}

/// One VF held by one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The network (config `name`) that attached it: GC looks at its own.
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    /// The pod's netns path at ADD.
    pub netns: String,
    pub pci: String,
    /// The PF's PCI address, and the VF's number on it.
    pub pf: String,
    pub vf: u32,
    /// `None` in DPDK mode: the VF has no netdev.
    pub netdev: Option<Netdev>,
    /// Each PF-side setting ADD changed, as it was before.
    pub saved: Vec<VfSetting>,
}

impl Record {
    /// Whether this record is of the attachment `container_id`/`ifname`.
    pub fn is(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

/// The records of one state dir, locked.
pub struct Records {
    dir: PathBuf,
    _lock: Flock<File>,
}

fn io(what: String, e: impl std::fmt::Display) -> Error {
    Error::new(code::IO_FAILURE, what).with_details(e.to_string())
}

impl Records {
    /// Takes the dir's lock (waiting for another call that holds it),
    /// making the dir if needed.
    pub fn lock(dir: &Path) -> Result<Records, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("create state dir {}", dir.display()), e))?;
        let path = dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(format!("open {}", path.display()), e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io(format!("lock {}", path.display()), e))?;
        Ok(Records {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn path(&self, pci: &str) -> PathBuf {
        self.dir.join(format!("{pci}.json"))
    }

    /// The record of a VF, if it is held.
    pub fn get(&self, pci: &str) -> Result<Option<Record>, Error> {
        let path = self.path(pci);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io(format!("read record {}", path.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("read record {}", path.display()), e)),
        }
    }

    /// Every record (a leftover temporary file of a killed write is removed).
    pub fn all(&self) -> Result<Vec<Record>, Error> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| io(format!("read state dir {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json.tmp") {
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(pci) = name.strip_suffix(".json") {
                out.extend(self.get(pci)?);
            }
        }
        Ok(out)
    }

    /// Writes a record durably (a complete file or none).
    pub fn put(&self, record: &Record) -> Result<(), Error> {
        let path = self.path(&record.pci);
        let tmp = self.dir.join(format!("{}.json.tmp", record.pci));
        let what = || format!("write record {}", path.display());
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| io(what(), e))?;
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_data()))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .and_then(|_| File::open(&self.dir).and_then(|d| d.sync_all()));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(what(), e)
        })
    }

    /// Forgets a VF: it is back as it was.
    pub fn remove(&self, pci: &str) -> Result<(), Error> {
        let path = self.path(pci);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("remove record {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::VlanProto;

    #[test]
    fn records_round_trip_and_go() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sriov");
        let records = Records::lock(&dir).unwrap();
        assert_eq!(records.get("0000:01:10.4").unwrap(), None);
        let r = Record {
            network: "sr".into(),
            container_id: "c1".into(),
            ifname: "net1".into(),
            netns: "/var/run/netns/p".into(),
            pci: "0000:01:10.4".into(),
            pf: "0000:01:00.0".into(),
            vf: 2,
            netdev: Some(Netdev {
                name: "eth3".into(),
                mac: vec![2, 0, 0, 0, 0, 1],
                up: false,
            }),
            saved: vec![
                VfSetting::Vlan {
                    id: 0,
                    qos: 0,
                    proto: VlanProto::Dot1Q,
                },
                VfSetting::Trust(false),
            ],
        };
        records.put(&r).unwrap();
        std::fs::write(dir.join("0000:01:10.6.json.tmp"), "{").unwrap();
        assert_eq!(records.get("0000:01:10.4").unwrap(), Some(r.clone()));
        assert_eq!(records.all().unwrap(), vec![r.clone()]);
        assert!(!dir.join("0000:01:10.6.json.tmp").exists());
        assert!(r.is("c1", "net1") && !r.is("c1", "net2"));
        records.remove("0000:01:10.4").unwrap();
        records.remove("0000:01:10.4").unwrap();
        assert!(records.all().unwrap().is_empty());
    }
}
