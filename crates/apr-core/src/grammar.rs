//! The spawn/join grammar of the APR thread protocol (spec §2.4), byte-exact.
//!
//! A parent thread ends a turn with a *spawn block*:
//!
//! ```text
//! <Calling Sub Searches>
//! <Start Sub Search 0 at level 1> Moving to Node #0,0
//! <Start Sub Search 1 at level 1> Moving to Node #0,2
//! <End Calling Sub Searches>
//! ```
//!
//! The runtime removes that block from the parent's context and appends a *join block*
//! carrying each child's outcome:
//!
//! ```text
//! <Sub Searches>
//! <No Solution in Sub Search 0 at level 1 at Node #0,0>
//! <Goal Reached in Sub Search 1 at level 1 at Node #0,2>
//! Moving to Node #0,2
//! ...
//! 27,27 equal: Goal Reached
//! <End Sub Searches>
//! ```
//!
//! Everything here is strict: a block either parses to exactly what [`SpawnBlock::format`] or
//! [`JoinBlock::format`] would write, or it is a typed [`GrammarError`]. Nothing panics on any input.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

/// First line of a spawn block.
pub const SPAWN_OPEN: &str = "<Calling Sub Searches>";
/// Last line of a spawn block.
pub const SPAWN_CLOSE: &str = "<End Calling Sub Searches>";
/// First line of a join block; also the marker a parent must never write itself.
pub const JOIN_OPEN: &str = "<Sub Searches>";
/// Last line of a join block.
pub const JOIN_CLOSE: &str = "<End Sub Searches>";

const START_PREFIX: &str = "<Start Sub Search ";
const NO_SOLUTION_PREFIX: &str = "<No Solution in Sub Search ";
const GOAL_PREFIX: &str = "<Goal Reached in Sub Search ";
const MOVING_PREFIX: &str = "Moving to Node #";

/// A node of the search tree, written `#0,2,3` in traces: the root is `0`, and the k-th
/// non-terminal successor of node `p` is `p,k`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Parses the text after `#`: one or more decimal components separated by commas.
    pub fn parse(text: &str) -> Result<Self, GrammarError> {
        let valid = !text.is_empty()
            && text
                .split(',')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
        if valid {
            Ok(NodeId(text.to_owned()))
        } else {
            Err(GrammarError::BadNodeId(truncate_for_error(text)))
        }
    }

    /// The id without the leading `#`, e.g. `0,2`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of this node's parent, or `None` for a root.
    pub fn parent(&self) -> Option<NodeId> {
        self.0.rfind(',').map(|i| NodeId(self.0[..i].to_owned()))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NodeId {
    type Error = GrammarError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        NodeId::parse(&value)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

/// Why a block of text is not valid protocol grammar.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// The text has no `<Calling Sub Searches>` line.
    #[error("no `<Calling Sub Searches>` line")]
    NoSpawnOpen,
    /// The spawn block never reaches `<End Calling Sub Searches>`.
    #[error("spawn block is not closed by `<End Calling Sub Searches>`")]
    UnclosedSpawn,
    /// Text follows the closing line of a block.
    #[error("unexpected text after the end of the block: {0:?}")]
    TrailingText(String),
    /// A spawn block names no children.
    #[error("spawn block names no sub searches")]
    EmptySpawn,
    /// A line inside a block is not one the grammar allows there.
    #[error("line {line} is not valid here: {text:?}")]
    BadLine {
        /// 1-based line number inside the block.
        line: usize,
        /// The offending line (truncated).
        text: String,
    },
    /// Sub search indices must count 0, 1, 2, … in order.
    #[error("sub search index {found} where {expected} was expected")]
    BadIndex {
        /// The index the grammar requires at this position.
        expected: usize,
        /// The index the text names.
        found: String,
    },
    /// Every line of one block must name the same level.
    #[error("sub search level {found} where {expected} was expected")]
    BadLevel {
        /// The level of the first line of the block.
        expected: u32,
        /// The level this line names.
        found: String,
    },
    /// A node id is not a comma-separated list of decimal numbers.
    #[error("bad node id {0:?}")]
    BadNodeId(String),
    /// A `Goal Reached` entry of a join block carries no returned path.
    #[error("sub search {0} reports a goal but returns no path")]
    EmptyPath(usize),
    /// The join block does not start with `<Sub Searches>`.
    #[error("no `<Sub Searches>` line")]
    NoJoinOpen,
    /// The join block never reaches `<End Sub Searches>`.
    #[error("join block is not closed by `<End Sub Searches>`")]
    UnclosedJoin,
}

fn truncate_for_error(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// A parsed spawn block: the nodes a parent hands to its children, in spawn order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnBlock {
    /// Nesting level of the children (always 1 in the reference: children never spawn).
    pub level: u32,
    /// One node per child; child `i` explores `children[i]`.
    pub children: Vec<NodeId>,
}

impl SpawnBlock {
    /// Writes the block, every line ending in `\n`.
    pub fn format(&self) -> String {
        let mut out = String::with_capacity(64 + 48 * self.children.len());
        self.write_to(&mut out);
        out
    }

    /// Appends the block to `out`.
    pub fn write_to(&self, out: &mut String) {
        out.push_str(SPAWN_OPEN);
        out.push('\n');
        for (i, node) in self.children.iter().enumerate() {
            let _ = writeln!(
                out,
                "{START_PREFIX}{i} at level {}> {MOVING_PREFIX}{node}",
                self.level
            );
        }
        out.push_str(SPAWN_CLOSE);
        out.push('\n');
    }

    /// Parses a whole block, from `<Calling Sub Searches>` to `<End Calling Sub Searches>`, with
    /// or without the final newline.
    pub fn parse(block: &str) -> Result<Self, GrammarError> {
        let body = block
            .strip_prefix(SPAWN_OPEN)
            .and_then(|rest| rest.strip_prefix('\n'))
            .ok_or(GrammarError::NoSpawnOpen)?;
        let mut level = None;
        let mut children = Vec::new();
        let mut lines = body.split('\n');
        let mut n = 0;
        while let Some(line) = lines.next() {
            n += 1;
            if line == SPAWN_CLOSE {
                let rest: Vec<&str> = lines.collect();
                // Only a single trailing newline may follow the closing line.
                if !(rest.is_empty() || rest == [""]) {
                    return Err(GrammarError::TrailingText(truncate_for_error(
                        &rest.join("\n"),
                    )));
                }
                if children.is_empty() {
                    return Err(GrammarError::EmptySpawn);
                }
                return Ok(SpawnBlock {
                    level: level.unwrap_or(1),
                    children,
                });
            }
            if line.is_empty() && lines.clone().next().is_none() {
                break; // the text ended (with a newline) before the closing line
            }
            let (index, line_level, tail) = parse_indexed(line, START_PREFIX, "> ", n + 1)?;
            check_index(index, children.len())?;
            check_level(&mut level, line_level)?;
            let id = tail
                .strip_prefix(MOVING_PREFIX)
                .ok_or_else(|| bad_line(n + 1, line))?;
            children.push(NodeId::parse(id)?);
        }
        Err(GrammarError::UnclosedSpawn)
    }
}

/// What one child returned to its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinEntry {
    /// The node the child explored.
    pub node: NodeId,
    /// The child's returned path (its summary, without trailing newline), or `None` when it found
    /// no solution.
    pub result: Option<String>,
}

/// A parsed join block: one entry per child, in spawn order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinBlock {
    /// Nesting level of the children.
    pub level: u32,
    /// One entry per child.
    pub entries: Vec<JoinEntry>,
}

impl JoinBlock {
    /// Writes the block, every line ending in `\n`.
    pub fn format(&self) -> String {
        let mut out = String::with_capacity(
            64 + self
                .entries
                .iter()
                .map(|e| 64 + e.result.as_ref().map_or(0, |r| r.len() + 1))
                .sum::<usize>(),
        );
        self.write_to(&mut out);
        out
    }

    /// Appends the block to `out`.
    pub fn write_to(&self, out: &mut String) {
        out.push_str(JOIN_OPEN);
        out.push('\n');
        for (i, entry) in self.entries.iter().enumerate() {
            let prefix = if entry.result.is_some() {
                GOAL_PREFIX
            } else {
                NO_SOLUTION_PREFIX
            };
            let _ = writeln!(
                out,
                "{prefix}{i} at level {} at Node #{}>",
                self.level, entry.node
            );
            if let Some(path) = &entry.result {
                out.push_str(path);
                out.push('\n');
            }
        }
        out.push_str(JOIN_CLOSE);
        out.push('\n');
    }

    /// Parses a whole block, from `<Sub Searches>` to `<End Sub Searches>`, with or without the
    /// final newline. A returned path runs until the next entry line or the closing line.
    pub fn parse(block: &str) -> Result<Self, GrammarError> {
        let body = block
            .strip_prefix(JOIN_OPEN)
            .and_then(|rest| rest.strip_prefix('\n'))
            .ok_or(GrammarError::NoJoinOpen)?;
        let mut level = None;
        let mut entries: Vec<JoinEntry> = Vec::new();
        // Path lines of the current `Goal Reached` entry, as a byte range of `body`.
        let mut path: Option<(usize, usize)> = None;
        let mut offset = 0;
        let mut lines = body.split('\n');
        let mut n = 1;
        while let Some(line) = lines.next() {
            n += 1;
            let line_start = offset;
            offset += line.len() + 1;
            let is_entry = line.starts_with(GOAL_PREFIX) || line.starts_with(NO_SOLUTION_PREFIX);
            if line.is_empty() && lines.clone().next().is_none() {
                break; // the text ended (with a newline) before the closing line
            }
            if line == JOIN_CLOSE || is_entry {
                if let Some(range) = path.take() {
                    close_path(&mut entries, body, range)?;
                }
            }
            if line == JOIN_CLOSE {
                let rest: Vec<&str> = lines.collect();
                if !(rest.is_empty() || rest == [""]) {
                    return Err(GrammarError::TrailingText(truncate_for_error(
                        &rest.join("\n"),
                    )));
                }
                return Ok(JoinBlock {
                    level: level.unwrap_or(1),
                    entries,
                });
            }
            if is_entry {
                let goal = line.starts_with(GOAL_PREFIX);
                let prefix = if goal {
                    GOAL_PREFIX
                } else {
                    NO_SOLUTION_PREFIX
                };
                let (index, line_level, tail) = parse_indexed(line, prefix, " at Node #", n)?;
                check_index(index, entries.len())?;
                check_level(&mut level, line_level)?;
                let id = tail.strip_suffix('>').ok_or_else(|| bad_line(n, line))?;
                entries.push(JoinEntry {
                    node: NodeId::parse(id)?,
                    result: None,
                });
                if goal {
                    path = Some((offset, offset));
                }
            } else if let Some((start, _)) = path {
                path = Some((start, line_start + line.len()));
            } else {
                return Err(bad_line(n, line));
            }
        }
        Err(GrammarError::UnclosedJoin)
    }
}

fn close_path(
    entries: &mut [JoinEntry],
    body: &str,
    (start, end): (usize, usize),
) -> Result<(), GrammarError> {
    let index = entries.len() - 1;
    if end <= start {
        return Err(GrammarError::EmptyPath(index));
    }
    entries[index].result = Some(body[start..end].to_owned());
    Ok(())
}

fn bad_line(line: usize, text: &str) -> GrammarError {
    GrammarError::BadLine {
        line,
        text: truncate_for_error(text),
    }
}

/// Splits `<prefix>{index} at level {level}{sep}{tail}` into its parts.
fn parse_indexed<'a>(
    line: &'a str,
    prefix: &str,
    sep: &str,
    line_no: usize,
) -> Result<(&'a str, &'a str, &'a str), GrammarError> {
    let rest = line
        .strip_prefix(prefix)
        .ok_or_else(|| bad_line(line_no, line))?;
    let (index, rest) = rest
        .split_once(" at level ")
        .ok_or_else(|| bad_line(line_no, line))?;
    let (level, tail) = rest
        .split_once(sep)
        .ok_or_else(|| bad_line(line_no, line))?;
    Ok((index, level, tail))
}

fn check_index(found: &str, expected: usize) -> Result<(), GrammarError> {
    // Compare as text: the formatter never writes leading zeros or signs.
    if found == expected.to_string() {
        Ok(())
    } else {
        Err(GrammarError::BadIndex {
            expected,
            found: truncate_for_error(found),
        })
    }
}

fn check_level(level: &mut Option<u32>, found: &str) -> Result<(), GrammarError> {
    let parsed = found
        .parse::<u32>()
        .ok()
        .filter(|l| *l >= 1 && found == l.to_string());
    match (parsed, *level) {
        (Some(l), None) => {
            *level = Some(l);
            Ok(())
        }
        (Some(l), Some(expected)) if l == expected => Ok(()),
        (_, expected) => Err(GrammarError::BadLevel {
            expected: expected.unwrap_or(1),
            found: truncate_for_error(found),
        }),
    }
}

/// A parent thread's text split at its last spawn block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnSplit<'a> {
    /// Everything before the last `<Calling Sub Searches>\n`: the context the join continues.
    pub before: &'a str,
    /// The parsed block.
    pub block: SpawnBlock,
}

/// Finds the last spawn block of a parent's text and parses it. The block must run to the end of
/// the text (one trailing newline allowed): a parent's turn ends with its spawn block.
pub fn split_spawn(parent_text: &str) -> Result<SpawnSplit<'_>, GrammarError> {
    let open = last_line_start(parent_text, SPAWN_OPEN).ok_or(GrammarError::NoSpawnOpen)?;
    let block = SpawnBlock::parse(&parent_text[open..])?;
    Ok(SpawnSplit {
        before: &parent_text[..open],
        block,
    })
}

/// Does this text end with a spawn block's closing line (one trailing newline allowed)? This is
/// the reference runtime's test for "the parent wants children" (its last line contains the
/// closing marker).
pub fn ends_with_spawn(text: &str) -> bool {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let last_line = text.rsplit('\n').next().unwrap_or(text);
    last_line.contains(SPAWN_CLOSE)
}

/// Byte offset of the last occurrence of `marker` that starts a line and is followed by `\n` or
/// the end of the text.
fn last_line_start(text: &str, marker: &str) -> Option<usize> {
    let mut end = text.len();
    while let Some(pos) = text[..end].rfind(marker) {
        let starts_line = pos == 0 || text.as_bytes()[pos - 1] == b'\n';
        let after = &text[pos + marker.len()..];
        if starts_line && (after.is_empty() || after.starts_with('\n')) {
            return Some(pos);
        }
        end = pos;
    }
    None
}

/// Builds the parent's post-join context: the text before its spawn block followed by the join
/// block (spec §2.4; the reference's `get_main_trace_after_sub_search`).
pub fn join_context(before_spawn: &str, join: &JoinBlock) -> String {
    let mut out = String::with_capacity(before_spawn.len() + 256);
    out.push_str(before_spawn);
    join.write_to(&mut out);
    out
}

/// Prompt conditioning prefixes (spec §2.3–2.4): `Sub Call Budget: N ` asks an APR parent for N
/// children per spawn; `Token Budget: B ` asks a serial model to fit in B tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditioning {
    /// Child-count condition for APR parents.
    pub sub_call_budget: Option<u32>,
    /// Token-budget condition (SoS+; APR children inherit it in the reference).
    pub token_budget: Option<u32>,
}

impl Conditioning {
    /// The text to put before a prompt.
    pub fn prefix(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.sub_call_budget {
            let _ = write!(out, "Sub Call Budget: {n} ");
        }
        if let Some(b) = self.token_budget {
            let _ = write!(out, "Token Budget: {b} ");
        }
        out
    }

    /// The SoS+ token-budget bin for a trace of `tokens` tokens: the smallest multiple of 512 at
    /// or above it, capped at `cap` (4,096 in the paper).
    pub fn token_budget_bin(tokens: usize, cap: u32) -> u32 {
        let bin = tokens.div_ceil(512).max(1) * 512;
        (bin as u64).min(cap as u64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<NodeId> {
        list.iter().map(|s| NodeId::parse(s).unwrap()).collect()
    }

    #[test]
    fn spawn_block_is_byte_exact() {
        let block = SpawnBlock {
            level: 1,
            children: ids(&["0,0", "0,2", "0,1"]),
        };
        let text = "<Calling Sub Searches>\n\
<Start Sub Search 0 at level 1> Moving to Node #0,0\n\
<Start Sub Search 1 at level 1> Moving to Node #0,2\n\
<Start Sub Search 2 at level 1> Moving to Node #0,1\n\
<End Calling Sub Searches>\n";
        assert_eq!(block.format(), text);
        assert_eq!(SpawnBlock::parse(text).unwrap(), block);
        assert_eq!(SpawnBlock::parse(text.trim_end()).unwrap(), block);
    }

    #[test]
    fn join_block_is_byte_exact() {
        let path = "Moving to Node #0,2\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\nExploring Operation: 31/31=1, Resulting Numbers: [26, 1]\nGenerated Node #0,2,0: 27:[26, 1] Operation: 31/31=1\nMoving to Node #0,2,0\nCurrent State: 27:[26, 1], Operations: ['53-22=31', '31/31=1']\nExploring Operation: 26+1=27, Resulting Numbers: [27]\n27,27 equal: Goal Reached";
        let block = JoinBlock {
            level: 1,
            entries: vec![
                JoinEntry {
                    node: NodeId::parse("0,0").unwrap(),
                    result: None,
                },
                JoinEntry {
                    node: NodeId::parse("0,2").unwrap(),
                    result: Some(path.to_owned()),
                },
            ],
        };
        let text = format!(
            "<Sub Searches>\n<No Solution in Sub Search 0 at level 1 at Node #0,0>\n<Goal Reached in Sub Search 1 at level 1 at Node #0,2>\n{path}\n<End Sub Searches>\n"
        );
        assert_eq!(block.format(), text);
        assert_eq!(JoinBlock::parse(&text).unwrap(), block);
    }

    #[test]
    fn split_spawn_finds_the_last_block() {
        let parent = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>\n";
        let split = split_spawn(parent).unwrap();
        assert_eq!(
            split.before,
            "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
        );
        assert_eq!(split.block.children, ids(&["0,0"]));
        assert!(ends_with_spawn(parent));
        assert!(!ends_with_spawn("Moving to Node #0\nNo solution found.\n"));
    }

    #[test]
    fn rejects_malformed_blocks() {
        let cases: &[(&str, GrammarError)] = &[
            ("<Calling Sub Searches>\n<End Calling Sub Searches>\n", GrammarError::EmptySpawn),
            (
                "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n",
                GrammarError::UnclosedSpawn,
            ),
            (
                "<Calling Sub Searches>\n<Start Sub Search 1 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>",
                GrammarError::BadIndex {
                    expected: 0,
                    found: "1".into(),
                },
            ),
            (
                "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,,0\n<End Calling Sub Searches>",
                GrammarError::BadNodeId("0,,0".into()),
            ),
            (
                "<Calling Sub Searches>\n<Start Sub Search 00 at level 1> Moving to Node #0\n<End Calling Sub Searches>",
                GrammarError::BadIndex {
                    expected: 0,
                    found: "00".into(),
                },
            ),
        ];
        for (text, err) in cases {
            assert_eq!(SpawnBlock::parse(text).unwrap_err(), *err, "{text}");
        }
        assert_eq!(
            JoinBlock::parse("<Sub Searches>\n<Goal Reached in Sub Search 0 at level 1 at Node #0,1>\n<End Sub Searches>\n")
                .unwrap_err(),
            GrammarError::EmptyPath(0)
        );
        assert!(matches!(
            JoinBlock::parse("<Sub Searches>\ngarbage\n<End Sub Searches>\n").unwrap_err(),
            GrammarError::BadLine { .. }
        ));
    }

    #[test]
    fn conditioning_prefixes_and_bins() {
        let c = Conditioning {
            sub_call_budget: Some(10),
            token_budget: None,
        };
        assert_eq!(c.prefix(), "Sub Call Budget: 10 ");
        assert_eq!(Conditioning::token_budget_bin(1, 4096), 512);
        assert_eq!(Conditioning::token_budget_bin(512, 4096), 512);
        assert_eq!(Conditioning::token_budget_bin(513, 4096), 1024);
        assert_eq!(Conditioning::token_budget_bin(9000, 4096), 4096);
    }
}
