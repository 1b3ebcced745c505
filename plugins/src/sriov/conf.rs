//! `plexus-sriov`'s config: sriov-cni's fields, read once into settings
//! the PF can apply.

use std::path::PathBuf;

use cni::plugin::Request;
use cni::{code, Error};
use serde_json::Value;

use super::device::parse_pci;
use crate::kernel::netlink::{VfLink, VfSetting, VlanProto};

/// Where records of the VFs Plexus changed are kept unless `stateDir` says.
pub const STATE_DIR: &str = "/var/lib/plexus/sriov";

/// A validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Conf {
    /// The VF: `runtimeConfig.deviceID` (a device plugin's choice), else
    /// `deviceID`. Needed by ADD and CHECK; DEL finds its VF in its record.
    pub device: Option<String>,
    /// A MAC for the VF (`mac`, or the `mac` capability).
    pub mac: Option<[u8; 6]>,
    /// What to set on the PF for the VF, in the order it is set.
    pub settings: Vec<VfSetting>,
    pub state_dir: PathBuf,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

/// `stateDir` alone: what DEL and GC need to find the records.
pub fn state_dir(req: &Request) -> Result<PathBuf, Error> {
    match req.conf.extra.get("stateDir") {
        None | Some(Value::Null) => Ok(PathBuf::from(STATE_DIR)),
        Some(Value::String(d)) if d.starts_with('/') => Ok(PathBuf::from(d)),
        Some(v) => Err(invalid(format!("stateDir {v} is not an absolute path"))),
    }
}

impl Conf {
    /// Reads and checks every field; the error names the device when the
    /// config names one.
    pub fn parse(req: &Request) -> Result<Conf, Error> {
        let extra = &req.conf.extra;
        let from_runtime = req
            .conf
            .runtime_config
            .as_ref()
            .and_then(|rt| rt.device_id.clone())
            .filter(|d| !d.is_empty());
        let device = match (from_runtime, extra.get("deviceID")) {
            (Some(d), _) => Some(parse_pci(&d)?),
            (None, None | Some(Value::Null)) => None,
            (None, Some(Value::String(d))) => Some(parse_pci(d)?),
            (None, Some(v)) => return Err(invalid(format!("deviceID {v} is not a string"))),
        };
        let who = device.as_deref().unwrap_or("plexus-sriov");
        let fault = |what: String| invalid(format!("{who}: {what}"));

        let uint = |key: &str, max: u64| -> Result<Option<u64>, Error> {
            match extra.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n <= max => Ok(Some(n)),
                    _ => Err(fault(format!("{key} {v} is not a number from 0 to {max}"))),
                },
            }
        };
        let word = |key: &str, allowed: &[&str]| -> Result<Option<String>, Error> {
            match extra.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if allowed.contains(&s.to_ascii_lowercase().as_str()) => {
                    Ok(Some(s.to_ascii_lowercase()))
                }
                Some(v) => Err(fault(format!(
                    "{key} {v} is not one of {}",
                    allowed.join(", ")
                ))),
            }
        };

        let mut settings = Vec::new();
        let from_rt = req
            .conf
            .runtime_config
            .as_ref()
            .and_then(|rt| rt.mac.clone());
        let mac = match from_rt
            .as_deref()
            .or(extra.get("mac").and_then(Value::as_str))
        {
            Some(m) => {
                let mac = crate::sublink::parse_mac(m).map_err(|e| fault(e.msg))?;
                if mac[0] & 1 == 1 || mac == [0; 6] {
                    return Err(fault(format!("mac {m} is not a unicast address")));
                }
                settings.push(VfSetting::Mac(mac));
                Some(mac)
            }
            None => None,
        };

        let vlan = uint("vlan", 4094)?;
        let qos = uint("vlanQoS", 7)?;
        let proto = word("vlanProto", &["802.1q", "802.1ad"])?;
        match vlan {
            Some(id) => settings.push(VfSetting::Vlan {
                id: id as u16,
                qos: qos.unwrap_or(0) as u8,
                proto: match proto.as_deref() {
                    Some("802.1ad") => VlanProto::Dot1Ad,
                    _ => VlanProto::Dot1Q,
                },
            }),
            None if qos.is_some_and(|q| q != 0) => {
                return Err(fault("vlanQoS needs a vlan".into()));
            }
            None if proto.as_deref() == Some("802.1ad") => {
                return Err(fault("vlanProto needs a vlan".into()));
            }
            None => {}
        }
        if vlan == Some(0) && (qos.is_some_and(|q| q != 0) || proto.as_deref() == Some("802.1ad")) {
            return Err(fault(
                "vlan 0 takes no vlanQoS or vlanProto: the VF is untagged".into(),
            ));
        }

        let on_off = ["on", "off"];
        if let Some(s) = word("spoofchk", &on_off)? {
            settings.push(VfSetting::SpoofCheck(s == "on"));
        }
        if let Some(s) = word("trust", &on_off)? {
            settings.push(VfSetting::Trust(s == "on"));
        }
        if let Some(s) = word("link_state", &["auto", "enable", "disable"])? {
            settings.push(VfSetting::LinkState(match s.as_str() {
                "enable" => VfLink::Enable,
                "disable" => VfLink::Disable,
                _ => VfLink::Auto,
            }));
        }
        let min = uint("min_tx_rate", u64::from(u32::MAX))?;
        let max = uint("max_tx_rate", u64::from(u32::MAX))?;
        if min.is_some() || max.is_some() {
            let (min, max) = (min.unwrap_or(0) as u32, max.unwrap_or(0) as u32);
            if max != 0 && min > max {
                return Err(fault(format!(
                    "min_tx_rate {min} is above max_tx_rate {max}"
                )));
            }
            settings.push(VfSetting::Rate { min, max });
        }

        let state_dir = state_dir(req)?;
        Ok(Conf {
            device,
            mac,
            settings,
            state_dir,
        })
    }

    /// The VF, which ADD and CHECK need.
    pub fn device(&self) -> Result<&str, Error> {
        self.device.as_deref().ok_or_else(|| {
            invalid("plexus-sriov needs a VF: deviceID in the config or in runtimeConfig")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cni::plugin::Command;
    use serde_json::json;

    fn req(conf: Value) -> Request {
        let stdin = serde_json::to_vec(&conf).unwrap();
        let (conf, version) = cni::NetConf::parse(&stdin).unwrap();
        Request {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/p".into(),
            ifname: "net1".into(),
            args: String::new(),
            path: String::new(),
            stdin,
            conf,
            version,
        }
    }

    fn base(extra: Value) -> Value {
        let mut c = json!({"cniVersion": "1.0.0", "name": "sr", "type": "plexus-sriov",
            "deviceID": "0000:01:10.4"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn every_field() {
        let c = Conf::parse(&req(base(json!({
            "vlan": 100, "vlanQoS": 3, "vlanProto": "802.1Q", "mac": "02:00:00:00:02:02",
            "spoofchk": "off", "trust": "on", "link_state": "enable",
            "min_tx_rate": 10, "max_tx_rate": 100, "stateDir": "/tmp/sr"
        }))))
        .unwrap();
        assert_eq!(c.device.as_deref(), Some("0000:01:10.4"));
        assert_eq!(
            c.settings,
            vec![
                VfSetting::Mac([2, 0, 0, 0, 2, 2]),
                VfSetting::Vlan {
                    id: 100,
                    qos: 3,
                    proto: VlanProto::Dot1Q
                },
                VfSetting::SpoofCheck(false),
                VfSetting::Trust(true),
                VfSetting::LinkState(VfLink::Enable),
                VfSetting::Rate { min: 10, max: 100 },
            ]
        );
        assert_eq!(c.state_dir, PathBuf::from("/tmp/sr"));
        let c = Conf::parse(&req(base(json!({})))).unwrap();
        assert!(c.settings.is_empty());
        assert_eq!(c.state_dir, PathBuf::from(STATE_DIR));
    }

    #[test]
    fn runtime_config_wins() {
        let c = Conf::parse(&req(base(json!({
            "runtimeConfig": {"deviceID": "0000:01:10.6", "mac": "02:00:00:00:00:09"},
            "mac": "02:00:00:00:00:01"
        }))))
        .unwrap();
        assert_eq!(c.device.as_deref(), Some("0000:01:10.6"));
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 9]));
    }

    #[test]
    fn faults_name_the_device() {
        for (extra, want) in [
            (
                json!({"vlan": 4095}),
                "0000:01:10.4: vlan 4095 is not a number from 0 to 4094",
            ),
            (json!({"vlan": -1}), "vlan -1"),
            (json!({"vlan": "100"}), "vlan \"100\""),
            (json!({"vlanQoS": 3}), "vlanQoS needs a vlan"),
            (json!({"vlan": 5, "vlanQoS": 8}), "vlanQoS 8"),
            (
                json!({"vlan": 5, "vlanProto": "802.1x"}),
                "vlanProto \"802.1x\"",
            ),
            (
                json!({"vlan": 0, "vlanProto": "802.1ad"}),
                "vlan 0 takes no",
            ),
            (
                json!({"spoofchk": true}),
                "spoofchk true is not one of on, off",
            ),
            (json!({"link_state": "up"}), "link_state"),
            (
                json!({"min_tx_rate": 200, "max_tx_rate": 100}),
                "above max_tx_rate",
            ),
            (json!({"mac": "01:00:5e:00:00:01"}), "not a unicast"),
            (json!({"mac": "nope"}), "0000:01:10.4: mac \"nope\""),
            (json!({"deviceID": "01:10.4"}), "not a PCI address"),
            (json!({"stateDir": "rel"}), "stateDir"),
        ] {
            let e = Conf::parse(&req(base(extra.clone()))).unwrap_err();
            assert_eq!(e.code, 7, "{extra}");
            assert!(e.msg.contains(want), "{extra}: {e}");
        }
        let mut no_device = base(json!({}));
        no_device.as_object_mut().unwrap().remove("deviceID");
        let c = Conf::parse(&req(no_device)).unwrap();
        assert!(c.device().unwrap_err().msg.contains("deviceID"));
    }
}
