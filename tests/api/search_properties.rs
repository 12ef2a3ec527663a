//! Property tests of the embedded index's matching, over generated text mixing Latin,
//! Greek, Cyrillic, Turkish, German, CJK and emoji (with precomposed and decomposed
//! letters, ligatures and full-width forms):
//!
//! * every substring of a stored body finds it, as written, upper-cased and lower-cased;
//! * the results are exactly the bodies of the chat that hold every term under the
//!   folding ([`matches`]): none lacks a term, none that holds them all is missed.
//!
//! Substrings are cut between the generator's units, which are whole grapheme clusters:
//! a cut inside `e` + combining accent would change what the letter is.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use chat_system::search::embedded::EmbeddedIndex;
use chat_system::search::{MessageDoc, SearchQuery, matches, parse_terms};
use proptest::prelude::*;

/// The generator's units. Not `ı` (dotless i): Unicode's default case folding keeps it
/// apart from `I`, its upper case, so its upper-cased form is rightly not found (the
/// conformance suite pins that).
const UNITS: &[&str] = &[
    "a", "B", "e", "z", "É", "e\u{301}", "ß", "S", "ﬁ", "Ａ", "ｂ", // Latin
    "Σ", "σ", "ς", "Ω", "ά", "Λ", // Greek
    "Ж", "ж", "Я", "ё", // Cyrillic
    "İ", "ş", "Ç", "ğ", // Turkish
    "ä", "Ö", "ü", "ẞ", // German
    "東", "京", "語", "한", "カ", // CJK
    "🎉", "😀", "👍🏽", // emoji
    " ",
];

fn units(max: usize) -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(UNITS), 1..max)
}

struct Shared {
    index: EmbeddedIndex,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One index for every case; each case has a chat of its own.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "chat-system-search-properties-{:016x}",
            getrandom::u64().expect("random")
        ));
        // The time budget is not what these tests are about: a machine busy with other
        // work must not turn a slow search into a failed property.
        let index = EmbeddedIndex::open(&dir, true)
            .expect("index")
            .with_budget(std::time::Duration::from_secs(60));
        Shared {
            index,
            _dir: TempDir(dir),
        }
    })
}

fn next_chat() -> u64 {
    static CHAT: AtomicU64 = AtomicU64::new(1);
    CHAT.fetch_add(1, Ordering::Relaxed)
}

/// Indexes `bodies` in a new chat; returns the chat.
fn index_chat(bodies: &[String]) -> u64 {
    let chat = next_chat();
    let at = chrono::Utc::now();
    let docs = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| MessageDoc {
            token: "props".into(),
            chat,
            number: i as u64 + 1,
            body: body.clone(),
            version: 1,
            created_at: at,
            updated_at: at,
        })
        .collect();
    shared().index.index(docs).expect("index");
    chat
}

/// The numbers the index finds for `terms` in `chat`.
fn found(chat: u64, terms: &[String]) -> Vec<u64> {
    let query = SearchQuery {
        token: "props".into(),
        chat,
        terms: terms.to_vec(),
        after: 0,
        limit: 1000,
    };
    shared()
        .index
        .search(&query)
        .expect("search")
        .into_iter()
        .map(|d| d.number)
        .collect()
}

/// The numbers of the bodies that hold every term under the folding.
fn expected(bodies: &[String], terms: &[String]) -> Vec<u64> {
    (1..)
        .zip(bodies)
        .filter(|(_, body)| matches(body, terms))
        .map(|(n, _)| n)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_substring_finds_its_body_in_any_case_and_results_hold_every_term(
        chats in prop::collection::vec(units(40), 1..6),
        pick in any::<prop::sample::Index>(),
        cut in (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
    ) {
        let bodies: Vec<String> = chats.iter().map(|u| u.concat()).collect();
        let chat = index_chat(&bodies);
        let owner = pick.index(chats.len());
        let body = &chats[owner];
        let (a, b) = (cut.0.index(body.len()), cut.1.index(body.len()));
        let substring = body[a.min(b)..=a.max(b)].concat();
        for form in [substring.clone(), substring.to_uppercase(), substring.to_lowercase()] {
            let Ok(terms) = parse_terms(Some(&form)) else {
                continue; // only whitespace
            };
            let numbers = found(chat, &terms);
            prop_assert!(
                numbers.contains(&(owner as u64 + 1)),
                "{form:?} (terms {terms:?}) did not find {:?}", bodies[owner]
            );
            prop_assert_eq!(numbers, expected(&bodies, &terms), "{:?} in {:?}", form, bodies);
        }
    }

    #[test]
    fn any_query_finds_exactly_the_bodies_that_hold_every_folded_term(
        chats in prop::collection::vec(units(30), 1..8),
        query in prop::collection::vec(units(6), 1..3),
    ) {
        let bodies: Vec<String> = chats.iter().map(|u| u.concat()).collect();
        let chat = index_chat(&bodies);
        let q = query.iter().map(|u| u.concat()).collect::<Vec<_>>().join(" ");
        if let Ok(terms) = parse_terms(Some(&q)) {
            prop_assert_eq!(found(chat, &terms), expected(&bodies, &terms), "{:?} in {:?}", q, bodies);
        }
    }
}
