//! The spec versions this crate speaks.

use std::fmt;
use std::str::FromStr;

use crate::error::{code, Error};

/// A CNI spec version this crate can read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    /// Every supported version, oldest first.
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];
    /// The newest version, used where no config names one.
    pub const LATEST: Version = Version::V1_1_0;

    /// The version as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// GC and STATUS exist from 1.1.0 on.
    pub fn has_gc_and_status(self) -> bool {
        self >= Version::V1_1_0
    }

    /// The supported versions as strings, for VERSION answers and error details.
    pub fn supported() -> Vec<&'static str> {
        Self::ALL.iter().map(|v| v.as_str()).collect()
    }

    /// Parses a config's `cniVersion`, refusing unsupported ones with code 1.
    pub fn from_config(s: &str) -> Result<Version, Error> {
        s.parse().map_err(|_| {
            Error::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
                format!(
                    "config is {s:?}, plugin supports {:?}",
                    Version::supported()
                ),
            )
        })
    }
}

impl FromStr for Version {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        assert_eq!("0.4.0".parse::<Version>(), Ok(Version::V0_4_0));
        assert!("0.2.0".parse::<Version>().is_err());
        assert!(Version::V0_3_1 < Version::V1_0_0);
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V1_1_0.has_gc_and_status());
        let e = Version::from_config("9.9.9").unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.details.contains("9.9.9"));
    }
}
