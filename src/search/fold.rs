//! Unicode NFKC case folding (`NFKC_Casefold`, which ICU calls `nfkc_cf`): the one
//! meaning of "case-insensitive" in search. A body matches a term when the folded body
//! contains the folded term; every backend indexes, queries and verifies folded text,
//! and the stored body is never altered.
//!
//! The folding removes the differences of case (`Straße` / `STRASSE`, `ΟΔΟΣ` / `οδος`,
//! `İ` / `i̇`), of compatibility forms (`ﬁ` / `fi`, `Ａ` / `a`), of canonical
//! composition (precomposed and decomposed `é`) and the default-ignorable code points
//! (soft hyphens, zero-width joiners, variation selectors).
//!
//! Unicode defines it per character: the `NFKC_Casefold` value of a character is what
//! repeated compatibility decomposition, full case folding and removal of
//! default-ignorable code points leave of it; a string is folded by mapping each
//! character to its value and bringing the result to NFC. Folding a string as a whole
//! instead would differ where a mapping changes a combining class (U+0345, the Greek
//! iota subscript, folds to a spacing `ι`), so the per-character order is kept here.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use icu_casemap::CaseMapper;
use icu_normalizer::{ComposingNormalizerBorrowed, DecomposingNormalizerBorrowed};
use icu_properties::CodePointSetData;
use icu_properties::props::DefaultIgnorableCodePoint;

/// Per-thread cache of the values of the non-ASCII characters seen: computing one
/// takes a few passes over a short string, while texts repeat few distinct characters.
/// Cleared when full, so a text of many distinct characters cannot grow it unbounded.
const CACHE_CHARS: usize = 4096;

thread_local! {
    static CACHE: RefCell<HashMap<char, Box<str>>> = RefCell::new(HashMap::new());
}

/// `text` under `NFKC_Casefold`; borrowed when it is already folded ASCII.
pub fn fold(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        if text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Cow::Owned(text.to_ascii_lowercase());
        }
        return Cow::Borrowed(text);
    }
    let mut mapped = String::with_capacity(text.len());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        for c in text.chars() {
            if c.is_ascii() {
                mapped.push(c.to_ascii_lowercase());
                continue;
            }
            if let Some(value) = cache.get(&c) {
                mapped.push_str(value);
                continue;
            }
            let value = char_value(c);
            mapped.push_str(&value);
            if cache.len() >= CACHE_CHARS {
                cache.clear();
            }
            cache.insert(c, value.into_boxed_str());
        }
    });
    match ComposingNormalizerBorrowed::new_nfc().normalize(&mapped) {
        Cow::Borrowed(_) => Cow::Owned(mapped),
        Cow::Owned(composed) => Cow::Owned(composed),
    }
}

/// The `NFKC_Casefold` value of one character, decomposed (the caller composes).
fn char_value(c: char) -> String {
    let nfkd = DecomposingNormalizerBorrowed::new_nfkd();
    let case = CaseMapper::new();
    let ignorable = CodePointSetData::new::<DefaultIgnorableCodePoint>();
    let mut value = String::from(c);
    // Unicode keeps the value stable after one or two rounds; the bound only guards
    // against data that would not settle.
    for _ in 0..8 {
        let decomposed = nfkd.normalize(&value);
        let folded = case.fold_string(&decomposed);
        let next: String = folded.chars().filter(|&c| !ignorable.contains(c)).collect();
        if next == value {
            break;
        }
        value = next;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn folds(text: &str, expected: &str) {
        assert_eq!(fold(text), expected, "fold({text:?})");
    }

    #[test]
    fn ascii_is_lowercased_and_borrowed_when_already_folded() {
        folds("Hello, WORLD 42!", "hello, world 42!");
        assert!(matches!(fold("already folded"), Cow::Borrowed(_)));
    }

    #[test]
    fn full_case_folding_expands_and_unifies_letters() {
        folds("Straße", "strasse");
        folds("STRASSE", "strasse");
        folds("ẞ", "ss");
        // Final and medial sigma fold alike.
        folds("ΟΔΟΣ", "οδοσ");
        folds("οδος", "οδοσ");
        folds("ПРИВЕТ", "привет");
    }

    #[test]
    fn dotted_capital_i_keeps_its_dot_as_a_combining_mark() {
        folds("İ", "i\u{307}");
        folds("İstanbul", "i\u{307}stanbul");
        folds("DİYARBAKIR", "di\u{307}yarbakir");
        // Default (not Turkish) folding: the dotless ı stays itself.
        folds("ı", "ı");
    }

    #[test]
    fn compatibility_forms_fold_to_their_plain_letters() {
        folds("ﬁnance", "finance");
        folds("ＡＢＣ", "abc");
        folds("①", "1");
        folds("㎏", "kg");
        folds("Ω", "ω"); // OHM SIGN
        folds("Å", "å"); // ANGSTROM SIGN
    }

    #[test]
    fn precomposed_and_decomposed_letters_fold_alike_and_composed() {
        folds("E\u{301}cole", "\u{e9}cole");
        folds("\u{c9}COLE", "\u{e9}cole");
        folds("e\u{301}cole", "\u{e9}cole");
        folds("\u{e9}cole", "\u{e9}cole");
    }

    #[test]
    fn default_ignorable_code_points_are_removed() {
        folds("soft\u{ad}hyphen", "softhyphen");
        folds("zero\u{200b}width", "zerowidth");
        // The emoji's variation selector goes; the emoji stays.
        folds("\u{2764}\u{fe0f}", "\u{2764}");
    }

    #[test]
    fn iota_subscript_folds_per_character_before_composing() {
        // U+0345 folds to a spacing iota (combining class 0), so the acute accent after
        // it attaches to that iota, as it does in ICU's nfkc_cf.
        folds("\u{3b1}\u{345}\u{301}", "\u{3b1}\u{3af}");
        folds("ᾼ", "αι");
    }

    #[test]
    fn scripts_without_case_are_kept() {
        folds("東京タワー🎉", "東京タワー🎉");
        folds("한국어", "한국어");
    }

    #[test]
    fn folding_is_idempotent() {
        for text in [
            "Straße İ ΟΔΟΣ ﬁ Ａ E\u{301} ᾼ ㎏ \u{2764}\u{fe0f}",
            "Ǆ ǅ ǆ ϐ ẛ",
        ] {
            let once = fold(text).into_owned();
            assert_eq!(fold(&once), once);
        }
    }
}
