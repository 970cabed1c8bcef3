//! APR or SoS+: the one choice every layer makes (which solver writes the traces, how SFT cuts
//! them, how the runtime runs a problem, how a model is evaluated).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How problems are solved, and so how traces are written and cut for training.
///
/// Written as `apr` / `serial` (records, cards); read as `apr`, `serial` or `sosp` (the solver's
/// and the SFT view's name since the first traces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Adaptive Parallel Reasoning: a parent spawns children, each its own thread; SFT trains on
    /// every call as its own sequence.
    Apr,
    /// Stream of Search+: one thread per problem, a spawn block is just text; SFT trains on the
    /// whole serial trace.
    #[serde(alias = "sosp")]
    Serial,
}

impl Mode {
    /// Both modes, APR first.
    pub const ALL: [Mode; 2] = [Mode::Apr, Mode::Serial];

    /// The name records and cards use: `apr` or `serial`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Apr => "apr",
            Mode::Serial => "serial",
        }
    }

    /// The name in prose and tables: `APR` or `SoS+`.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Apr => "APR",
            Mode::Serial => "SoS+",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is neither `apr`, `serial` nor `sosp`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a mode (apr, sosp or serial)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "apr" => Ok(Mode::Apr),
            "serial" | "sosp" | "sos+" => Ok(Mode::Serial),
            _ => Err(UnknownMode(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_reads_back_and_writes_the_record_name() {
        for (text, mode) in [
            ("apr", Mode::Apr),
            ("APR", Mode::Apr),
            ("serial", Mode::Serial),
            ("sosp", Mode::Serial),
            ("SoS+", Mode::Serial),
        ] {
            assert_eq!(text.parse::<Mode>(), Ok(mode));
        }
        assert_eq!(
            "tree".parse::<Mode>().unwrap_err().to_string(),
            "`tree` is not a mode (apr, sosp or serial)"
        );
        for mode in Mode::ALL {
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{}\"", mode.name()));
            assert_eq!(serde_json::from_str::<Mode>(&json).unwrap(), mode);
            assert_eq!(mode.name().parse::<Mode>(), Ok(mode));
        }
        assert_eq!(
            serde_json::from_str::<Mode>("\"sosp\"").unwrap(),
            Mode::Serial
        );
    }
}
