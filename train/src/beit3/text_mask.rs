//! BERT-style text masking for masked language modelling: a fixed share of the maskable tokens (never special
//! tokens or padding) is chosen; of those, 80% become the mask token, 10% a random non-special token, 10% stay
//! unchanged; all of them are predicted. Each draw is a pure function of `(seed, epoch, sample_id)`.

use imglish_ingest::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The text masking of one model: the tokenizer's mask token, its special tokens, its vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextMasking {
    mask_id: u32,
    pad_id: u32,
    vocab: u32,
    /// Sorted special token ids (never masked, never drawn as random replacements).
    special: Vec<u32>,
}

/// One masked text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedText {
    /// The model's input ids (chosen positions replaced as BERT does).
    pub input: Vec<u32>,
    /// `true` where the token is predicted.
    pub predict: Vec<bool>,
}

/// Key separating text-mask draws from every other draw keyed by `(seed, epoch, sample_id)`.
const TEXT_MASK_KEY: u64 = 0x6d6c_6d5f_6d61_736b;

impl TextMasking {
    /// Masking for a text vocabulary of `vocab` ids with these special tokens; `mask_id` and `pad_id` must be
    /// among them.
    pub fn new(vocab: u32, mask_id: u32, pad_id: u32, special: impl IntoIterator<Item = u32>) -> Result<TextMasking> {
        let mut special: Vec<u32> = special.into_iter().collect();
        special.sort_unstable();
        special.dedup();
        let bad = |m: String| Err(TrainError::Config(m));
        if let Some(&s) = special.iter().find(|&&s| s >= vocab) {
            return bad(format!(
                "special text token {s} is not below the text vocabulary {vocab}"
            ));
        }
        for (what, id) in [("mask", mask_id), ("padding", pad_id)] {
            if special.binary_search(&id).is_err() {
                return bad(format!("the {what} token {id} is not one of the special tokens"));
            }
        }
        if special.len() as u64 >= u64::from(vocab) {
            return bad("the text vocabulary has no ordinary tokens".into());
        }
        Ok(TextMasking {
            mask_id,
            pad_id,
            vocab,
            special,
        })
    }

    /// From a dataset's special token names: the mask token is `[MASK]` or `<mask>`, padding `[PAD]` or
    /// `<pad>`.
    pub fn from_special_ids(vocab: u32, ids: &std::collections::BTreeMap<String, u32>) -> Result<TextMasking> {
        let find = |names: &[&str]| names.iter().find_map(|n| ids.get(*n).copied());
        let mask = find(&["[MASK]", "<mask>"]).ok_or_else(|| {
            TrainError::Config(format!(
                "the text tokenizer has no mask token ([MASK] or <mask>; its special tokens: {})",
                ids.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let pad = find(&["[PAD]", "<pad>"]).ok_or_else(|| {
            TrainError::Config(format!(
                "the text tokenizer has no padding token ([PAD] or <pad>; its special tokens: {})",
                ids.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        TextMasking::new(vocab, mask, pad, ids.values().copied())
    }

    /// The mask token id.
    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }

    /// The padding token id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.binary_search(&id).is_ok()
    }

    /// How many of `maskable` tokens are predicted at `ratio`: `round(ratio * maskable)`, at least one when
    /// there is any.
    pub fn count(ratio: f64, maskable: usize) -> usize {
        if maskable == 0 {
            return 0;
        }
        ((ratio * maskable as f64).round() as usize).clamp(1, maskable)
    }

    /// Masks `ids` at `ratio` for `(seed, epoch, sample_id)`.
    pub fn mask(&self, ids: &[u32], ratio: f64, seed: u64, epoch: u64, sample_id: u64) -> MaskedText {
        let mut rng = Rng::keyed(&[seed, epoch, sample_id, TEXT_MASK_KEY]);
        let mut candidates: Vec<usize> = (0..ids.len()).filter(|&i| !self.is_special(ids[i])).collect();
        let k = Self::count(ratio, candidates.len());
        // Partial Fisher-Yates: the first k entries are a uniform k-subset.
        for i in 0..k {
            let j = i + rng.below((candidates.len() - i) as u64) as usize;
            candidates.swap(i, j);
        }
        let mut input = ids.to_vec();
        let mut predict = vec![false; ids.len()];
        for &pos in &candidates[..k] {
            predict[pos] = true;
            let r = rng.next_f64();
            if r < 0.8 {
                input[pos] = self.mask_id;
            } else if r < 0.9 {
                input[pos] = self.random_ordinary(&mut rng);
            }
        }
        MaskedText { input, predict }
    }

    /// A uniformly drawn non-special token.
    fn random_ordinary(&self, rng: &mut Rng) -> u32 {
        let ordinary = u64::from(self.vocab) - self.special.len() as u64;
        let mut id = rng.below(ordinary) as u32;
        // Map the k-th ordinary id to its value by stepping over the specials below it.
        for &s in &self.special {
            if s <= id {
                id += 1;
            } else {
                break;
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masking() -> TextMasking {
        // 0 pad, 1 unk, 2 bos, 3 eos, 4 mask; 100 ids in all.
        TextMasking::new(100, 4, 0, [0, 1, 2, 3, 4]).expect("masking")
    }

    fn text(n: usize) -> Vec<u32> {
        let mut ids = vec![2];
        ids.extend((0..n).map(|i| 5 + (i as u32 * 7) % 95));
        ids.push(3);
        ids.extend([0, 0, 0]);
        ids
    }

    #[test]
    fn exact_share_and_specials_never_masked() {
        let m = masking();
        for n in [1usize, 2, 7, 20, 40] {
            let ids = text(n);
            for ratio in [0.15, 0.5] {
                for id in 0..50 {
                    let t = m.mask(&ids, ratio, 1, 0, id);
                    let predicted = t.predict.iter().filter(|&&p| p).count();
                    assert_eq!(predicted, TextMasking::count(ratio, n), "n {n} ratio {ratio}");
                    for (i, &orig) in ids.iter().enumerate() {
                        if m.is_special(orig) {
                            assert!(!t.predict[i], "special {orig} predicted");
                            assert_eq!(t.input[i], orig, "special {orig} replaced");
                        } else if !t.predict[i] {
                            assert_eq!(t.input[i], orig);
                        }
                    }
                }
            }
        }
        assert_eq!(TextMasking::count(0.15, 20), 3);
        assert_eq!(TextMasking::count(0.15, 2), 1);
        assert_eq!(TextMasking::count(0.5, 0), 0);
    }

    #[test]
    fn bert_80_10_10_over_many_draws() {
        let m = masking();
        let ids = text(40);
        let (mut masked, mut random, mut same, mut total) = (0usize, 0usize, 0usize, 0usize);
        for id in 0..5000 {
            let t = m.mask(&ids, 0.15, 3, 2, id);
            for i in (0..ids.len()).filter(|&i| t.predict[i]) {
                total += 1;
                if t.input[i] == 4 {
                    masked += 1;
                } else if t.input[i] == ids[i] {
                    same += 1;
                } else {
                    random += 1;
                    assert!(
                        !m.is_special(t.input[i]),
                        "random replacement {} is special",
                        t.input[i]
                    );
                }
            }
        }
        // 30,000 predictions: the shares are within 1 percentage point (> 3 standard deviations).
        let share = |c: usize| c as f64 / total as f64;
        assert_eq!(total, 5000 * 6);
        assert!((share(masked) - 0.8).abs() < 0.01, "mask share {}", share(masked));
        // A random replacement equal to the original counts as unchanged: 1/95 of the random 10%.
        let expect_same = 0.1 + 0.1 / 95.0;
        assert!(
            (share(same) - expect_same).abs() < 0.01,
            "unchanged share {}",
            share(same)
        );
        assert!(
            (share(random) - (0.1 - 0.1 / 95.0)).abs() < 0.01,
            "random share {}",
            share(random)
        );
    }

    #[test]
    fn deterministic_and_keyed() {
        let m = masking();
        let ids = text(30);
        assert_eq!(m.mask(&ids, 0.5, 1, 2, 3), m.mask(&ids, 0.5, 1, 2, 3));
        assert_ne!(m.mask(&ids, 0.5, 1, 2, 3), m.mask(&ids, 0.5, 1, 3, 3));
        assert_ne!(m.mask(&ids, 0.5, 1, 2, 3), m.mask(&ids, 0.5, 1, 2, 4));
        assert_ne!(m.mask(&ids, 0.5, 1, 2, 3), m.mask(&ids, 0.5, 2, 2, 3));
    }

    #[test]
    fn random_replacements_cover_every_ordinary_token() {
        let m = TextMasking::new(10, 4, 0, [0, 4, 9]).expect("masking");
        let mut rng = Rng::new(1);
        let mut seen = [0usize; 10];
        for _ in 0..7000 {
            seen[m.random_ordinary(&mut rng) as usize] += 1;
        }
        for (id, &c) in seen.iter().enumerate() {
            if [0, 4, 9].contains(&id) {
                assert_eq!(c, 0, "special {id} drawn");
            } else {
                assert!((c as f64 - 1000.0).abs() < 150.0, "id {id} drawn {c} times");
            }
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(TextMasking::new(100, 4, 0, [0, 1]).is_err());
        assert!(TextMasking::new(100, 4, 0, [0, 4, 100]).is_err());
        let ids = [("[PAD]".to_string(), 0u32), ("[UNK]".to_string(), 1)]
            .into_iter()
            .collect();
        let e = TextMasking::from_special_ids(100, &ids).expect_err("no mask token");
        assert_eq!(
            e.to_string(),
            "invalid configuration: the text tokenizer has no mask token ([MASK] or <mask>; its special tokens: [PAD], [UNK])"
        );
    }
}
