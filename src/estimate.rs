//! Token estimation for text whose token count the provider did not report.
//!
//! The heuristic is deterministic, integer-only and tokenizer-free, so the filter and the
//! ledger agree on it and it costs almost nothing inside Envoy:
//!
//! - ASCII characters: one token per 4 characters (the usual figure for English and code).
//! - Other non-CJK characters (accented Latin, Cyrillic, Greek, Arabic, ...): each weighs as
//!   2 ASCII characters, i.e. one token per 2 characters (BPE vocabularies split them more).
//! - CJK ideographs, kana, hangul, full-width forms and emoji: one token each.
//! - Non-empty text is at least 1 token.
//!
//! `tokens = wide_chars + ceil((ascii_chars + 2 * other_chars) / 4)`.
//!
//! Streams add their text delta by delta to a [`TextTally`] and round once at the end, so the
//! estimate of a streamed text equals the estimate of the same text in one piece.

/// Running counts of the character classes the estimate distinguishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextTally {
    ascii: u64,
    other: u64,
    wide: u64,
}

impl TextTally {
    /// Count the characters of `text`.
    pub fn add(&mut self, text: &str) {
        if text.is_ascii() {
            self.ascii = self.ascii.saturating_add(text.len() as u64);
            return;
        }
        for ch in text.chars() {
            if ch.is_ascii() {
                self.ascii = self.ascii.saturating_add(1);
            } else if is_wide(ch) {
                self.wide = self.wide.saturating_add(1);
            } else {
                self.other = self.other.saturating_add(1);
            }
        }
    }

    /// Add another tally (e.g. per-part tallies of one response).
    pub fn merge(&mut self, other: &TextTally) {
        self.ascii = self.ascii.saturating_add(other.ascii);
        self.other = self.other.saturating_add(other.other);
        self.wide = self.wide.saturating_add(other.wide);
    }

    /// Characters (Unicode scalar values) counted so far.
    pub fn chars(&self) -> u64 {
        self.ascii
            .saturating_add(self.other)
            .saturating_add(self.wide)
    }

    /// Estimated tokens of everything counted so far.
    pub fn tokens(&self) -> u64 {
        let narrow_units = self.ascii.saturating_add(self.other.saturating_mul(2));
        self.wide.saturating_add(narrow_units.div_ceil(4))
    }
}

/// Estimated token count of `text` (see the module documentation for the rule).
pub fn estimate_tokens(text: &str) -> u64 {
    let mut tally = TextTally::default();
    tally.add(text);
    tally.tokens()
}

/// Characters that BPE tokenizers typically encode as one token or more each.
fn is_wide(ch: char) -> bool {
    matches!(ch as u32,
        0x1100..=0x11FF     // Hangul Jamo
        | 0x2E80..=0x2FDF   // CJK radicals, Kangxi radicals
        | 0x3000..=0x303F   // CJK symbols and punctuation
        | 0x3040..=0x30FF   // Hiragana, Katakana
        | 0x3100..=0x31FF   // Bopomofo, Hangul compatibility Jamo, Katakana extensions
        | 0x3200..=0x33FF   // enclosed CJK, CJK compatibility
        | 0x3400..=0x4DBF   // CJK extension A
        | 0x4E00..=0x9FFF   // CJK unified ideographs
        | 0xA960..=0xA97F   // Hangul Jamo extended A
        | 0xAC00..=0xD7FF   // Hangul syllables and Jamo extended B
        | 0xF900..=0xFAFF   // CJK compatibility ideographs
        | 0xFE30..=0xFE4F   // CJK compatibility forms
        | 0xFF00..=0xFFEF   // half-width and full-width forms
        | 0x1F000..=0x1FAFF // emoji and pictographs
        | 0x20000..=0x3FFFF // CJK extensions B and later
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_zero_tokens() {
        assert_eq!(estimate_tokens(""), 0);
    }

    #[test]
    fn non_empty_text_is_at_least_one_token() {
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("é"), 1);
    }

    #[test]
    fn ascii_is_four_characters_per_token_rounded_up() {
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("Hello, world! How are you?"), 7); // 26 chars
    }

    #[test]
    fn cjk_is_one_token_per_character() {
        assert_eq!(estimate_tokens("米饭作为主食"), 6);
        assert_eq!(estimate_tokens("こんにちは"), 5);
        assert_eq!(estimate_tokens("안녕하세요"), 5);
        assert_eq!(estimate_tokens("👋"), 1);
    }

    #[test]
    fn other_scripts_weigh_two_ascii_characters() {
        assert_eq!(estimate_tokens("привет"), 3); // 6 chars * 2 units / 4
        assert_eq!(estimate_tokens("café"), 2); // 3 + 2 units
    }

    #[test]
    fn mixed_text_adds_classes() {
        // 2 wide + ceil((5 ascii) / 4) = 2 + 2
        assert_eq!(estimate_tokens("Qwen 模型"), 4);
    }

    #[test]
    fn streamed_deltas_estimate_like_the_whole_text() {
        let parts = ["Hel", "lo, w", "orld", "! 你好", "", "…"];
        let mut tally = TextTally::default();
        for part in parts {
            tally.add(part);
        }
        assert_eq!(tally.tokens(), estimate_tokens(&parts.concat()));
        assert_eq!(tally.chars(), parts.concat().chars().count() as u64);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = TextTally::default();
        a.add("abcd");
        let mut b = TextTally::default();
        b.add("中文");
        a.merge(&b);
        assert_eq!(a.tokens(), 3);
        assert_eq!(a.chars(), 6);
    }
}
