//! Text tokens with Hugging Face `tokenizers`: load a `tokenizer.json` (overriding any baked-in padding and
//! truncation), or fit one on the manifest's captions.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{BertNormalizer, NormalizerWrapper};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The special tokens imglish's fitted text tokenizers have, with their ids.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"];

/// The model of a fitted text tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextModel {
    /// Byte-pair encoding.
    Bpe,
    /// WordPiece (BERT).
    Wordpiece,
    /// Unigram (SentencePiece-style).
    Unigram,
}

/// A text tokenizer with explicit special tokens and truncation, no padding (ragged ids).
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
    special: BTreeMap<String, u32>,
    overridden: Vec<String>,
    fingerprint: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("max_len", &self.max_len)
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

fn tok_err(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::Model {
        model: what.display().to_string(),
        reason: e.to_string(),
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`. Padding and truncation baked into the file are removed (and reported by
    /// [`TextTokenizer::overridden`]); ids are truncated to `max_len` after special tokens are added.
    pub fn load(path: &Path, max_len: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let fingerprint = crate::card::sha256_hex(
            format!("{max_len}\0")
                .as_bytes()
                .iter()
                .chain(&bytes)
                .copied()
                .collect::<Vec<u8>>()
                .as_slice(),
        );
        let mut inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        let mut overridden = Vec::new();
        if inner.get_padding().is_some() {
            overridden.push("padding".to_string());
            inner.with_padding(None);
        }
        if inner.get_truncation().is_some() {
            overridden.push("truncation".to_string());
            inner.with_truncation(None).map_err(|e| tok_err(path, e))?;
        }
        let mut special = BTreeMap::new();
        for (id, tok) in inner.get_added_tokens_decoder() {
            if tok.special {
                special.insert(tok.content.clone(), id);
            }
        }
        if max_len == 0 {
            return Err(tok_err(path, "--max-text-len must be at least 1"));
        }
        Ok(TextTokenizer {
            inner,
            max_len,
            special,
            overridden,
            fingerprint,
        })
    }

    /// What baked-in settings were overridden on load (`padding`, `truncation`).
    pub fn overridden(&self) -> &[String] {
        &self.overridden
    }

    /// sha256 over the tokenizer file and `max_len`: what determines the ids.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> u32 {
        self.inner.get_vocab_size(true) as u32
    }

    /// Special tokens and their ids.
    pub fn special_ids(&self) -> &BTreeMap<String, u32> {
        &self.special
    }

    /// The text of `ids` (special tokens left out), for showing a stored caption to a person.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Model {
            model: "text tokenizer".into(),
            reason: format!("cannot decode {ids:?}: {e}"),
        })
    }

    /// Token ids of one caption, with special tokens, truncated to `max_len` (the last id kept is the end
    /// token when the tokenizer has one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Model {
            model: "text tokenizer".into(),
            reason: format!("cannot encode {text:?}: {e}"),
        })?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            let eos = self.special.get("[EOS]").or_else(|| self.special.get("[SEP]")).copied();
            let last = ids.last().copied();
            ids.truncate(self.max_len);
            if let (Some(e), Some(l)) = (eos, last) {
                if l == e {
                    if let Some(x) = ids.last_mut() {
                        *x = e;
                    }
                }
            }
        }
        Ok(ids)
    }
}

impl TextTokenizer {
    /// Token ids of a document of any length, cut into consecutive segments of at most `max_len` ids each: the
    /// special tokens the tokenizer puts around a text (e.g. `[BOS] ... [EOS]`) wrap every segment, and no
    /// token is dropped.
    pub fn encode_segments(&self, text: &str) -> Result<Vec<Vec<u32>>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Model {
            model: "text tokenizer".into(),
            reason: format!("cannot encode a document of {} bytes: {e}", text.len()),
        })?;
        let ids = enc.get_ids();
        if ids.len() <= self.max_len {
            return Ok(vec![ids.to_vec()]);
        }
        let special: std::collections::HashSet<u32> = self.special.values().copied().collect();
        let head = ids.iter().take_while(|i| special.contains(i)).count();
        let tail = ids[head..].iter().rev().take_while(|i| special.contains(i)).count();
        let (prefix, body, suffix) = (&ids[..head], &ids[head..ids.len() - tail], &ids[ids.len() - tail..]);
        let room = self.max_len.saturating_sub(head + tail).max(1);
        Ok(body.chunks(room).map(|c| [prefix, c, suffix].concat()).collect())
    }
}

/// Trains a text tokenizer on `captions` and writes it as `tokenizer.json` to `out`.
pub fn fit_text_tokenizer(captions: &[String], model: TextModel, vocab_size: usize, out: &Path) -> Result<()> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut tok = match model {
        TextModel::Bpe => Tokenizer::new(
            BPE::builder()
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| tok_err(out, e))?,
        ),
        TextModel::Wordpiece => Tokenizer::new(
            WordPiece::builder()
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| tok_err(out, e))?,
        ),
        TextModel::Unigram => Tokenizer::new(Unigram::default()),
    };
    tok.with_normalizer(Some(NormalizerWrapper::from(BertNormalizer::new(
        true,
        true,
        Some(true),
        true,
    ))));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    let mut trainer: TrainerWrapper = match model {
        TextModel::Bpe => BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(1)
            .show_progress(false)
            .special_tokens(specials)
            .build()
            .into(),
        TextModel::Wordpiece => WordPieceTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(1)
            .show_progress(false)
            .special_tokens(specials)
            .build()
            .into(),
        TextModel::Unigram => UnigramTrainer::builder()
            .vocab_size(vocab_size as u32)
            .show_progress(false)
            .special_tokens(specials)
            .unk_token(Some("[UNK]".into()))
            .build()
            .map_err(|e| tok_err(out, e))?
            .into(),
    };
    tok.train(&mut trainer, captions.iter()).map_err(|e| tok_err(out, e))?;
    let bos = tok
        .token_to_id("[BOS]")
        .ok_or_else(|| tok_err(out, "[BOS] missing after training"))?;
    let eos = tok
        .token_to_id("[EOS]")
        .ok_or_else(|| tok_err(out, "[EOS] missing after training"))?;
    let post = TemplateProcessing::builder()
        .try_single("[BOS] $A [EOS]")
        .map_err(|e| tok_err(out, e))?
        .special_tokens(vec![("[BOS]", bos), ("[EOS]", eos)])
        .build()
        .map_err(|e| tok_err(out, e))?;
    tok.with_post_processor(Some(post));
    let tmp = out.with_extension("json.tmp");
    tok.save(&tmp, false).map_err(|e| tok_err(out, e))?;
    std::fs::rename(&tmp, out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(())
}
