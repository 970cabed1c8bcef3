//! Tokenizers: the domain tokenizer (one token per digit, per fixed phrase of the trace grammar,
//! per punctuation mark) saved as an HF `tokenizer.json`, or any HF `tokenizer.json` (e.g.
//! Llama-2's) to count tokens as the paper does.

use std::collections::HashMap;
use std::path::Path;

use apr_core::TextCodec;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::fixed_length::FixedLength;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

/// Padding token of the domain tokenizer (id 0, as Llama's `<unk>` pads).
pub const PAD: &str = "<pad>";
/// Beginning of sequence (id 1).
pub const BOS: &str = "<s>";
/// End of sequence (id 2).
pub const EOS: &str = "</s>";
/// Unknown (id 3): never produced by a successful [`AprTokenizer::encode`].
pub const UNK: &str = "<unk>";

/// Fixed phrases of the trace grammar, one token each (matched longest first).
pub const PHRASES: &[&str] = &[
    "Current State:",
    "Operations:",
    "Exploring Operation:",
    "Resulting Numbers:",
    "Generated Node #",
    "Moving to Node #",
    "Operation:",
    "equal:",
    "unequal:",
    "Goal Reached",
    "No Solution",
    "No solution found",
    "in sub search",
    "Start Sub Search at level",
    "Exit Sub Search at level",
    "<Calling Sub Searches>",
    "<End Calling Sub Searches>",
    "<Start Sub Search",
    "at level",
    "<Sub Searches>",
    "<End Sub Searches>",
    "<No Solution in Sub Search",
    "<Goal Reached in Sub Search",
    "at Node #",
    "Sub Call Budget:",
    "Token Budget:",
    ", ",
];

/// Single characters of the domain vocabulary.
pub const CHARS: &str = "0123456789 \n[],:'+-*/=#<>.";

/// Text a tokenizer cannot express, or a file it cannot read.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A character outside the vocabulary.
    #[error("cannot encode {ch:?} at byte {offset} of the text")]
    Unencodable {
        /// The character.
        ch: char,
        /// Byte offset in the input.
        offset: usize,
    },
    /// The tokenizers library failed.
    #[error("tokenizer: {0}")]
    Library(String),
}

/// A tokenizer with the runtime's view: ids, per-token text, special tokens.
#[derive(Clone)]
pub struct AprTokenizer {
    inner: Tokenizer,
    pieces: Vec<String>,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: Option<u32>,
}

impl std::fmt::Debug for AprTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AprTokenizer")
            .field("vocab", &self.pieces.len())
            .finish()
    }
}

fn lib_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

impl AprTokenizer {
    /// The domain tokenizer.
    pub fn domain() -> Self {
        Self::grammar(false)
    }

    /// The domain tokenizer with one token per number from 10 to 999 besides the single digits.
    /// Numbers of four digits or more, and digit runs with a leading zero, stay one digit per
    /// token, so every text still has exactly one encoding. Copying a number or stating a result
    /// is then one prediction instead of two or three: a small model learns the traces' arithmetic
    /// and bookkeeping in far fewer tokens (README, "Number tokens").
    pub fn numbers() -> Self {
        Self::grammar(true)
    }

    /// The built-in tokenizer called `name` (`domain` or `numbers`), if there is one.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "domain" => Some(Self::domain()),
            "numbers" => Some(Self::numbers()),
            _ => None,
        }
    }

    fn grammar(numbers: bool) -> Self {
        let mut vocab: Vec<String> = [PAD, BOS, EOS, UNK].iter().map(|s| s.to_string()).collect();
        vocab.extend(CHARS.chars().map(String::from));
        vocab.extend(PHRASES.iter().map(|s| s.to_string()));
        if numbers {
            vocab.extend((10..1000).map(|n| n.to_string()));
        }
        let map: HashMap<String, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(map.into_iter().collect())
            .unk_token(UNK.to_owned())
            .build()
            .expect("static vocabulary");
        let mut tok = Tokenizer::new(model);
        if numbers {
            // A number below 1,000 without a leading zero and not followed by another digit, or
            // else one character: the pieces are exactly the vocabulary's words.
            let split = Split::new(
                SplitPattern::Regex(r"[1-9][0-9]{0,2}(?![0-9])|[\s\S]".to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .expect("static pattern");
            tok.with_pre_tokenizer(Some(split));
        } else {
            tok.with_pre_tokenizer(Some(FixedLength::new(1)));
        }
        tok.with_decoder(Some(tokenizers::decoders::fuse::Fuse::new()));
        let _ = tok.add_special_tokens([PAD, BOS, EOS, UNK].map(|s| AddedToken::from(s, true)));
        let _ = tok.add_tokens(PHRASES.iter().map(|s| AddedToken::from(*s, false)));
        Self::wrap(tok).expect("domain tokenizer has its special tokens")
    }

    /// A built-in tokenizer by name (see [`AprTokenizer::builtin`]), else the HF `tokenizer.json`
    /// at that path.
    pub fn named_or_file(name_or_path: &Path) -> Result<Self, TokenizerError> {
        match name_or_path.to_str().and_then(Self::builtin) {
            Some(tok) => Ok(tok),
            None => Self::from_file(name_or_path),
        }
    }

    /// Loads any HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let tok =
            Tokenizer::from_file(path).map_err(|e| lib_err(format!("{}: {e}", path.display())))?;
        Self::wrap(tok)
    }

    /// Writes the HF `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner.save(path, true).map_err(lib_err)
    }

    fn wrap(inner: Tokenizer) -> Result<Self, TokenizerError> {
        let size = inner.get_vocab_size(true);
        let pieces: Vec<String> = (0..size as u32)
            .map(|id| piece_text(&inner.id_to_token(id).unwrap_or_default()))
            .collect();
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&[BOS, "<|begin_of_text|>", "<|endoftext|>"])
            .ok_or_else(|| lib_err("no BOS token (<s>)"))?;
        let eos = find(&[EOS, "<|end_of_text|>", "<|endoftext|>"])
            .ok_or_else(|| lib_err("no EOS token (</s>)"))?;
        let unk = find(&[UNK]);
        let pad = find(&[PAD]).or(unk).unwrap_or(0);
        Ok(AprTokenizer {
            inner,
            pieces,
            bos,
            eos,
            pad,
            unk,
        })
    }

    /// Token ids of `text` (no special tokens). Fails on anything the vocabulary cannot express.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(lib_err)?;
        if let Some(unk) = self.unk {
            if let Some(i) = enc.get_ids().iter().position(|&id| id == unk) {
                let offset = enc.get_offsets()[i].0;
                let ch = text[offset.min(text.len())..].chars().next().unwrap_or('?');
                return Err(TokenizerError::Unencodable { ch, offset });
            }
        }
        Ok(enc.get_ids().to_vec())
    }

    /// Concatenated text of the tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&id| self.piece(id)).collect()
    }

    /// The text of one token ("" for special tokens and unknown ids).
    pub fn piece(&self, id: u32) -> &str {
        if id == self.bos || id == self.eos || id == self.pad || Some(id) == self.unk {
            return "";
        }
        self.pieces.get(id as usize).map_or("", String::as_str)
    }

    /// The vocabulary's own name of a token (`<s>` for BOS, where [`AprTokenizer::piece`] gives
    /// the text it stands for, empty for special tokens).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// BOS id.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// EOS id.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Length of a training sequence `BOS + text + EOS` (the paper's token counts).
    pub fn sequence_len(&self, text: &str) -> Result<usize, TokenizerError> {
        Ok(self.encode(text)?.len() + 2)
    }
}

/// The text a vocabulary entry stands for: SentencePiece's `▁` is a space and `<0xNN>` byte
/// tokens are their (ASCII) byte.
fn piece_text(token: &str) -> String {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            if b.is_ascii() {
                return (b as char).to_string();
            }
        }
    }
    token.replace('\u{2581}', " ")
}

impl TextCodec for AprTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        AprTokenizer::encode(self, text).map_err(|e| e.to_string())
    }
    fn piece(&self, token: u32) -> &str {
        AprTokenizer::piece(self, token)
    }
    fn bos(&self) -> u32 {
        self.bos
    }
    fn eos(&self) -> u32 {
        self.eos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_tokens_are_phrases_digits_and_punctuation() {
        let tok = AprTokenizer::domain();
        let text = "Moving to Node #0,2\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\n<Calling Sub Searches>\n";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids), text);
        let pieces: Vec<&str> = ids.iter().map(|&i| tok.piece(i)).collect();
        assert_eq!(&pieces[..4], ["Moving to Node #", "0", ",", "2"]);
        assert!(pieces.contains(&"Current State:"));
        assert!(pieces.contains(&"<Calling Sub Searches>"));
        assert!(pieces.contains(&", "));
        assert_eq!(tok.bos_id(), 1);
        assert_eq!(tok.eos_id(), 2);
        assert_eq!(tok.pad_id(), 0);
    }

    #[test]
    fn number_tokens_cover_10_to_999_and_round_trip() {
        let tok = AprTokenizer::numbers();
        assert_eq!(tok.vocab_size(), AprTokenizer::domain().vocab_size() + 990);
        let text = "Current State: 27:[22, 26, 1005], Operations: ['0*7=0', '999+1=1000']\nMoving to Node #0,12\n";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids), text);
        let pieces: Vec<&str> = ids.iter().map(|&i| tok.piece(i)).collect();
        for number in ["27", "22", "26", "999", "12"] {
            assert!(pieces.contains(&number), "{number} in {pieces:?}");
        }
        // Four digits and more are spelled digit by digit, zeros too.
        let at = pieces.iter().position(|p| *p == "1").unwrap();
        assert_eq!(&pieces[at..at + 4], ["1", "0", "0", "5"]);
        assert!(!pieces
            .iter()
            .any(|p| p.len() > 1 && p.starts_with('0') && p.chars().all(|c| c.is_ascii_digit())));
        // Digit pieces are the same tokens in both tokenizers.
        let domain = AprTokenizer::domain();
        assert_eq!(tok.encode("7").unwrap(), domain.encode("7").unwrap());
        assert!(tok.encode(text).unwrap().len() < domain.encode(text).unwrap().len());
    }

    #[test]
    fn unencodable_text_is_an_error() {
        let tok = AprTokenizer::domain();
        let err = tok.encode("Current State: 2x").unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::Unencodable {
                    ch: 'x',
                    offset: 16
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn saved_tokenizer_json_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for tok in [AprTokenizer::domain(), AprTokenizer::numbers()] {
            tok.save(&path).unwrap();
            let again = AprTokenizer::from_file(&path).unwrap();
            let text = "<Sub Searches>\n<Goal Reached in Sub Search 0 at level 1 at Node #0,12>\n\
                        Exploring Operation: 27*40=1080, Resulting Numbers: [1080]\n";
            assert_eq!(again.encode(text).unwrap(), tok.encode(text).unwrap());
            assert_eq!(again.vocab_size(), tok.vocab_size());
        }
    }
}
