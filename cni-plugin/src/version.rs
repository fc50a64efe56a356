//! The CNI spec versions this plugin speaks, and what each one allows.

use std::fmt;

use ambient_common::constants::SUPPORTED_CNI_VERSIONS;

/// A CNI spec version the plugin supports (mirrors
/// [`ambient_common::constants::SUPPORTED_CNI_VERSIONS`]; a unit test keeps them equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest supported version: what VERSION reports and what errors use when the
    /// request's own version is unknown.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// Parses an exact version string; `None` for anything unsupported.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Results of 0.3.x and 0.4.0 carry `ips[].version`; 1.x results do not.
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// The supported versions as the spec lists them.
    pub fn supported() -> &'static [&'static str] {
        SUPPORTED_CNI_VERSIONS
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_the_shared_constant() {
        let ours: Vec<&str> = CniVersion::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(ours, SUPPORTED_CNI_VERSIONS);
        assert_eq!(
            CniVersion::LATEST.as_str(),
            *SUPPORTED_CNI_VERSIONS.last().unwrap()
        );
    }

    #[test]
    fn parses_only_exact_supported_strings() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        for bad in ["", "0.2.0", "0.1.0", "1.0", "1.2.0", " 1.0.0", "1.0.0 "] {
            assert_eq!(CniVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn operation_floors() {
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        assert!(CniVersion::V0_4_0.ips_carry_version());
        assert!(!CniVersion::V1_0_0.ips_carry_version());
    }
}
