//! The embedded index's n-grams: how a folded body is cut into indexed grams, and how a
//! folded term is answered from them.
//!
//! At every character position of the folded body one gram starts: the three characters
//! from there, or fewer at the last two positions (the *tails*). Each gram is indexed
//! with its position. So:
//!
//! * a term of three characters or more occurs at position `p` exactly when the grams of
//!   the term taken every three characters (and its last three) occur at `p` plus their
//!   offsets: a phrase of trigrams, answered from positions alone;
//! * a term of one or two characters occurs exactly when some gram starts with it (a
//!   tail ends a body, so the last one or two characters are found too): a prefix of the
//!   term dictionary.
//!
//! One gram per character is a third of what indexing every 1-, 2- and 3-gram costs,
//! and no stored body is read to decide a match.

use std::borrow::Cow;

use tantivy::tokenizer::{Token, TokenStream, Tokenizer};

use super::fold::fold;

/// Characters in a full gram.
pub const GRAM: usize = 3;

/// Folds text and cuts it into positioned grams (see the module documentation).
#[derive(Clone, Default)]
pub struct FoldedGrams;

impl Tokenizer for FoldedGrams {
    type TokenStream<'a> = GramStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> GramStream<'a> {
        let folded = fold(text);
        let starts = if folded.is_ascii() {
            None
        } else {
            Some(folded.char_indices().map(|(i, _)| i).collect())
        };
        GramStream {
            chars: starts.as_ref().map_or(folded.len(), Vec::len),
            folded,
            starts,
            next: 0,
            token: Token::default(),
        }
    }
}

pub struct GramStream<'a> {
    folded: Cow<'a, str>,
    /// Byte offset of each character; `None` for ASCII, where it is the index itself.
    starts: Option<Vec<usize>>,
    chars: usize,
    next: usize,
    token: Token,
}

impl GramStream<'_> {
    fn byte_at(&self, char_index: usize) -> usize {
        match &self.starts {
            None => char_index,
            Some(starts) => starts.get(char_index).copied().unwrap_or(self.folded.len()),
        }
    }
}

impl TokenStream for GramStream<'_> {
    fn advance(&mut self) -> bool {
        if self.next >= self.chars {
            return false;
        }
        let position = self.next;
        self.next += 1;
        let from = self.byte_at(position);
        let to = self.byte_at((position + GRAM).min(self.chars));
        self.token.text.clear();
        self.token.text.push_str(&self.folded[from..to]);
        self.token.offset_from = from;
        self.token.offset_to = to;
        self.token.position = position;
        true
    }

    fn token(&self) -> &Token {
        &self.token
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.token
    }
}

/// How one folded term is looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TermPlan {
    /// One or two characters: some gram starts with it.
    Prefix(String),
    /// Three or more: each gram at its offset (in characters) from the term's start.
    Phrase(Vec<(u32, String)>),
}

impl TermPlan {
    /// The plan for a folded, non-empty term.
    pub fn of(term: &str) -> Self {
        let chars: Vec<char> = term.chars().collect();
        if chars.len() < GRAM {
            return Self::Prefix(term.to_owned());
        }
        let last = chars.len() - GRAM;
        let mut offsets: Vec<usize> = (0..=last).step_by(GRAM).collect();
        if offsets.last() != Some(&last) {
            offsets.push(last);
        }
        Self::Phrase(
            offsets
                .into_iter()
                .map(|at| (at as u32, chars[at..at + GRAM].iter().collect()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grams(text: &str) -> Vec<(usize, String)> {
        let mut tokenizer = FoldedGrams;
        let mut stream = tokenizer.token_stream(text);
        let mut out = Vec::new();
        while stream.advance() {
            out.push((stream.token().position, stream.token().text.clone()));
        }
        out
    }

    #[test]
    fn one_folded_gram_starts_at_each_character_and_the_last_two_are_shorter() {
        let expected: Vec<(usize, String)> =
            [(0, "hel"), (1, "ell"), (2, "llo"), (3, "lo"), (4, "o")]
                .into_iter()
                .map(|(p, g)| (p, g.to_owned()))
                .collect();
        assert_eq!(grams("HeLLo"), expected);
        assert_eq!(grams("ab"), [(0, "ab".to_owned()), (1, "b".to_owned())]);
        assert!(grams("").is_empty());
    }

    #[test]
    fn positions_count_characters_of_the_folded_text() {
        // `ß` folds to two characters; `İ` to `i` and a combining dot.
        let got = grams("ßİx");
        let texts: Vec<&str> = got.iter().map(|(_, g)| g.as_str()).collect();
        assert_eq!(texts, ["ssi", "si\u{307}", "i\u{307}x", "\u{307}x", "x"]);
        assert_eq!(
            got.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let cjk = grams("東京タワー");
        assert_eq!(cjk[0], (0, "東京タ".to_owned()));
        assert_eq!(cjk[4], (4, "ー".to_owned()));
    }

    #[test]
    fn long_terms_become_trigrams_covering_every_character() {
        assert_eq!(TermPlan::of("ab"), TermPlan::Prefix("ab".into()));
        assert_eq!(
            TermPlan::of("abc"),
            TermPlan::Phrase(vec![(0, "abc".into())])
        );
        assert_eq!(
            TermPlan::of("abcdabcd"),
            TermPlan::Phrase(vec![
                (0, "abc".into()),
                (3, "dab".into()),
                (5, "bcd".into())
            ])
        );
        assert_eq!(
            TermPlan::of("abcdef"),
            TermPlan::Phrase(vec![(0, "abc".into()), (3, "def".into())])
        );
    }
}
