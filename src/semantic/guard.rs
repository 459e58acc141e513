//! Lexical guards: cheap checks on the words of two questions that a near cosine must also
//! pass (docs/design.md §5a, "precision first").
//!
//! Sentence embeddings place "Cancel my order" and "Don't cancel my order", or "Track order
//! 48213" and "Track order 48231", almost on top of each other. Each guard looks at one kind
//! of difference embeddings are blind to, and any one of them vetoes the match:
//!
//! - **numbers**: the numbers (digits or number words, ordinals included) must be the same;
//! - **negation**: the same count of negating words (`not`, `n't`, `never`, `without`, ...);
//! - **entities**: the same names (capitalised words not opening a sentence, acronyms, days and
//!   months);
//! - **opposites**: no pair of opposites (open/closed, include/exclude, increase/reduce, on/off,
//!   `safe`/`unsafe`, ...) where one question moved one way and the other the other way;
//! - **direction**: what comes after `from` in one question does not come after `to` in the
//!   other ("from my savings to my current account" and back again);
//! - **qualifier**: neither question narrows the other with a qualifying phrase. A qualifier
//!   is a content word after `in`/`on`/`at`/`for`/`with`/`during`/`near` ("in babies", "for
//!   a gift card", "on weekends"; fixed phrases such as "in advance" or "at the moment"
//!   excepted), or a part of a hyphenated compound ("self-employed"). The match is vetoed when
//!   one question has a qualifier with no counterpart (same word, same stem, one slip) in the
//!   other *and* the other has no content word of its own: a pure addition. When both have
//!   words of their own, they traded words, as paraphrases do, and the cosine decides.
//!
//! # Where the word lists come from
//!
//! The precision L2 reports is measured on labelled pairs (PyPI `fow-cache`'s `pairs.jsonl`,
//! split in two halves by `benches/semantic.rs`), so the lists must not have been written by
//! reading the half the figures come from. They were rebuilt in two steps:
//!
//! 1. **Generic English, written without the data**: closed-class negators, number words and
//!    ordinals, days, months and relative days, closed-class function words and greetings,
//!    the negating prefixes (`un-`, `in-`, `dis-`, ...), and domain-free antonyms of general
//!    English (open/close, include/exclude, increase/decrease, add/remove, more/less,
//!    before/after, buy/sell, enable/disable, on/off, in/out, up/down, start/stop,
//!    allow/forbid, send/receive, good/bad, ...).
//! 2. **Then only from the errors of the tuning half**
//!    (`cargo bench --all-features --bench semantic -- tuning`, which never reads the other
//!    half): each entry added that way names, beside it, the tuning pair that called for it
//!    (`avoid` as a negator, ban, approve/decline, compulsory/optional, within/after,
//!    home/abroad, visitor/resident, tenant/landlord, online/paper, benefits/drawbacks,
//!    pause/resume, free/paid, same/next, puppy/kitten, outstanding/inadequate). The direction
//!    guard was kept because three tuning traps need it (entity_swap-009, -013, -a014).
//!
//! The structural rules (light stemming, one slip allowed in names of five letters or more,
//! casing as a hint, contractions) are kept from the first version: generic, but written by
//! someone who had read traps of both halves.
//!
//! A scope guard (veto when one question adds a word that says what is asked and the other adds
//! none), designed from the tuning half's errors alone, was tried and taken out again: on the
//! held-out half it caught none of the default's false hits and turned down 12 pairs that
//! should hit (precision 0.932, recall 0.367, against 0.944 and 0.447 without it). Taking it out
//! was decided on that held-out run; README's L2 section says so.
//!
//! # The qualifier guard: designed on D, judged on C
//!
//! The tuning half was split again, the same way (alternate pairs of each category, by id),
//! into a design part D and a check part C (`cargo bench --all-features --bench semantic --
//! tuning-design` lists D with its texts; `-- tuning-check` prints C's counts only, never a
//! text). The rule was written from D alone: one of D's four false hits at cosine ≥ 0.80 adds
//! a qualifying phrase (scope-021, "flu" / "flu in babies"); D's right answers that also add
//! words (paraphrase-053 "for a trip", paraphrase-a021 "for my street" / "for my road",
//! paraphrase-b015 "order value") set the "pure addition" condition and kept the rule to
//! phrases. The preposition, determiner and idiom lists are generic English, written without
//! the data. The hyphenated compound is not from D: it was in the task's list of scope shapes
//! ("self-employed"), which goes back to the earlier scope guard's notes on scope-a002, a pair
//! of C, so C's verdict on that part is not blind.
//!
//! Three more candidates were designed on D and judged on C by the same written rule (keep a
//! rule if, among C's pairs it alone turns down, it catches more traps than it loses pairs
//! that should hit from cosine 0.80, and loses at most 2 at 0.92 or above): someone else in
//! place of "I" (scope-b003), a verb of stopping before an `-ing` verb counting as a negation
//! (negation-009, "water" / "stop watering"), and `out of` read as `from` (negation-a004,
//! "add money to" / "take money out of"). On C none of them turned down a pair alone (no trap
//! caught, no hit lost), so none is kept. The qualifier guard caught 2 traps on C (scope) and
//! lost no pair that should hit: kept. On the held-out half, run once after it was committed,
//! it caught none of the default's 4 false hits and lost one paraphrase at 0.92 (from 0.80: one
//! scope trap caught, two paraphrases lost). It stays, since nothing is adjusted on the
//! held-out half; README's L2 section has the figures.

/// Closed-class English negators (`n't` is split off by [`expand`]). Generic: written
/// without the data.
const NEGATORS: &[&str] = &[
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
    "cannot", "non",
    // From the tuning half: "Which foods should I eat / avoid before surgery?" (negation-003,
    // negation-b001).
    "avoid", "avoids", "avoided", "avoiding",
];

/// Pairs of opposite word groups. Generic, domain-free antonyms of general English (written
/// without the data), then the entries marked with the tuning-half error they came from.
#[rustfmt::skip]
const OPPOSITES: &[(&[&str], &[&str])] = &[
    (
        &["open", "opens", "opened", "opening"],
        &["close", "closes", "closed", "closing", "shut"],
    ),
    (
        &["include", "includes", "included", "including"],
        &["exclude", "excludes", "excluded", "excluding"],
    ),
    (
        &["increase", "increases", "increased", "increasing", "raise", "raises", "raised", "raising"],
        &["decrease", "decreases", "decreased", "decreasing", "reduce", "reduces", "reduced", "reducing"],
    ),
    (
        &["add", "adds", "added", "adding"],
        &["remove", "removes", "removed", "removing", "delete", "deletes", "deleted", "deleting"],
    ),
    (
        &["more"],
        &["less", "fewer"],
    ),
    (
        &["most", "max", "maximum"],
        &["least", "min", "minimum"],
    ),
    (
        &["high", "higher", "highest"],
        &["low", "lower", "lowest"],
    ),
    (
        &["big", "bigger", "biggest", "large", "larger", "largest"],
        &["small", "smaller", "smallest"],
    ),
    (
        &["long", "longer", "longest"],
        &["short", "shorter", "shortest"],
    ),
    (
        &["fast", "faster", "fastest"],
        &["slow", "slower", "slowest"],
    ),
    (
        &["cheap", "cheaper", "cheapest"],
        &["expensive"],
    ),
    (
        &["new", "newer", "newest"],
        &["old", "older", "oldest"],
    ),
    (
        &["before", "earlier"],
        &["after", "later"],
    ),
    (
        &["early"],
        &["late"],
    ),
    (
        &["buy", "buys", "buying", "bought"],
        &["sell", "sells", "selling", "sold"],
    ),
    (
        &["enable", "enables", "enabled", "enabling", "activate", "activates", "activated"],
        &["disable", "disables", "disabled", "disabling", "deactivate", "deactivates", "deactivated"],
    ),
    (
        &["on"],
        &["off"],
    ),
    (
        &["in", "into", "inside"],
        &["out", "outside"],
    ),
    (
        &["up"],
        &["down"],
    ),
    (
        &["above", "over"],
        &["below", "under"],
    ),
    (
        &["start", "starts", "started", "starting"],
        &["stop", "stops", "stopped", "stopping"],
    ),
    (
        &["allow", "allows", "allowed", "permit", "permitted"],
        &[
            "forbid", "forbids", "forbidden", "prohibit", "prohibited",
            // Tuning half: allow / ban pets (negation-b003).
            "ban", "bans", "banned",
        ],
    ),
    (
        // Tuning half: a claim approved / rejected (negation-a010).
        &["accept", "accepts", "accepted", "approve", "approves", "approved"],
        // Tuning half: accept / decline an invite (negation-023).
        &["reject", "rejects", "rejected", "decline", "declines", "declined"],
    ),
    (
        &["send", "sends", "sending", "sent"],
        &["receive", "receives", "receiving", "received"],
    ),
    (
        &["import", "imports", "imported", "importing"],
        &["export", "exports", "exported", "exporting"],
    ),
    (
        &["upload", "uploads", "uploaded", "uploading"],
        &["download", "downloads", "downloaded", "downloading"],
    ),
    (
        &["push", "pushes", "pushed", "pushing"],
        &["pull", "pulls", "pulled", "pulling"],
    ),
    (
        &["input", "inputs"],
        &["output", "outputs"],
    ),
    (
        &["internal"],
        &["external"],
    ),
    (
        &["public"],
        &["private"],
    ),
    (
        &["win", "wins", "won", "winning"],
        &["lose", "loses", "lost", "losing"],
    ),
    (
        &["pass", "passes", "passed", "passing"],
        &["fail", "fails", "failed", "failing"],
    ),
    (
        // Tuning half: schools rated outstanding / inadequate (negation-a022).
        &["good", "better", "best", "outstanding", "excellent"],
        &["bad", "worse", "worst", "inadequate", "poor"],
    ),
    (
        &["true"],
        &["false"],
    ),
    (
        &["same"],
        // Tuning half: a same-day / next-day appointment (number_date-017).
        &["different", "next"],
    ),
    (
        &["hot"],
        &["cold"],
    ),
    (
        &["north", "northern"],
        &["south", "southern"],
    ),
    (
        &["east", "eastern"],
        &["west", "western"],
    ),
    // The rest come from the errors of the tuning half (the pair ids of fow-cache's
    // pairs.jsonl in brackets), nothing else.
    (
        // Compulsory / optional subjects (negation-a008).
        &["compulsory", "mandatory", "required"],
        &["optional"],
    ),
    (
        // Cancel within / after the cooling-off period (scope-007).
        &["within"],
        &["after", "beyond"],
    ),
    (
        // A laptop at home / abroad (scope-a012).
        &["home"],
        &["abroad", "overseas"],
    ),
    (
        // Parking for visitors / residents (scope-017).
        &["visitor", "visitors"],
        &["resident", "residents"],
    ),
    (
        // Notice from a tenant / a landlord (scope-a020); switching supplier as a homeowner /
        // a tenant (scope-b013).
        &["tenant", "tenants"],
        &["landlord", "landlords", "homeowner", "homeowners"],
    ),
    (
        // An online / a paper tax return (scope-a004).
        &["online"],
        &["paper", "postal", "offline"],
    ),
    (
        // The benefits / drawbacks of remote work (negation-011).
        &["benefit", "benefits", "advantage", "advantages", "pros"],
        &["drawback", "drawbacks", "disadvantage", "disadvantages", "cons"],
    ),
    (
        // Pause / resume deliveries (negation-b011).
        &["pause", "pauses", "paused", "pausing"],
        &["resume", "resumes", "resumed", "resuming"],
    ),
    (
        // The rate limit of the free / the enterprise plan (scope-b007).
        &["free"],
        &["paid", "enterprise"],
    ),
    (
        // Vaccines for a puppy / a kitten (scope-013).
        &["puppy", "puppies", "dog", "dogs"],
        &["kitten", "kittens", "cat", "cats"],
    ),
];

/// Number words and ordinals, with the digits they stand for. Generic. (`one` is left out: it
/// is far more often a pronoun.)
#[rustfmt::skip]
const NUMBER_WORDS: &[(&str, &str)] = &[
    ("zero", "0"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"),
    ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10"), ("eleven", "11"),
    ("twelve", "12"), ("thirteen", "13"), ("fourteen", "14"), ("fifteen", "15"), ("sixteen", "16"),
    ("seventeen", "17"), ("eighteen", "18"), ("nineteen", "19"), ("twenty", "20"), ("thirty", "30"),
    ("forty", "40"), ("fifty", "50"), ("sixty", "60"), ("seventy", "70"), ("eighty", "80"),
    ("ninety", "90"), ("hundred", "100"), ("thousand", "1000"), ("million", "1000000"),
    ("billion", "1000000000"), ("half", "0.5"), ("dozen", "12"), ("first", "1"), ("second", "2"),
    ("third", "3"), ("fourth", "4"), ("fifth", "5"), ("sixth", "6"), ("seventh", "7"),
    ("eighth", "8"), ("ninth", "9"), ("tenth", "10"), ("twice", "2"),
];

/// Days, months and relative days: one that differs is a different question. Generic. (`may`
/// is left out: it is far more often the verb.)
#[rustfmt::skip]
const DATE_WORDS: &[&str] = &[
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "mondays",
    "tuesdays", "wednesdays", "thursdays", "fridays", "saturdays", "sundays", "january", "february",
    "march", "april", "june", "july", "august", "september", "october", "november", "december",
    "today", "tomorrow", "yesterday", "tonight",
];

/// Closed-class words (articles, pronouns, auxiliaries, prepositions, conjunctions, question
/// words) and greetings: never a name, and skipped when looking for what follows `from`/`to`.
/// Generic.
#[rustfmt::skip]
const FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "i", "me", "my", "mine", "we", "us", "our", "you", "your", "yours", "it",
    "its", "he", "him", "his", "she", "her", "they", "them", "their", "this", "that", "these",
    "those", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "doing",
    "have", "has", "had", "having", "can", "could", "will", "would", "shall", "should", "may",
    "might", "must", "to", "of", "in", "on", "at", "by", "for", "from", "with", "about", "into",
    "onto", "through", "as", "and", "or", "but", "if", "so", "then", "than", "there", "here",
    "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "any", "some", "all",
    "each", "every", "just", "also", "too", "very", "please", "hi", "hello", "hey", "thanks",
    "thank", "anyone", "someone", "something", "anything", "s", "d", "ll", "re", "ve", "m", "t",
];

/// Prepositions that open a phrase saying where, when, for whom or with what something is
/// asked ("in babies", "for a gift card", "on weekends"). Generic. Left out: `to` (also the
/// infinitive), `of` (reworded freely: "the capital of X" / "X's capital"), `from` (the
/// direction guard), and those with an opposite of their own (`before`/`after`, ...).
const QUALIFYING_PREPOSITIONS: &[&str] = &["in", "on", "at", "for", "with", "during", "near"];

/// Heads of fixed adverbial phrases that qualify nothing ("in advance", "at the moment", "in
/// general", "for now"). Generic English: written without the data.
#[rustfmt::skip]
const IDIOM_HEADS: &[&str] = &[
    "advance", "moment", "general", "fact", "example", "instance", "particular", "short",
    "total", "now", "least", "once", "last", "future", "case", "whole", "end", "way",
];

/// Articles, possessives and quantifiers: they may stand between a preposition and its noun.
#[rustfmt::skip]
const DETERMINERS: &[&str] = &[
    "a", "an", "the", "my", "your", "our", "their", "his", "her", "its", "this", "that", "these",
    "those", "some", "any", "each", "every", "all",
];

/// A guard: the veto it gives, and whether it objects to answering the first question with
/// the second's answer.
type Guard = (Veto, fn(&Lexicon, &Lexicon) -> bool);

/// The guards, in the order they are checked.
const GUARDS: [Guard; 6] = [
    (Veto::Numbers, Lexicon::numbers_differ),
    (Veto::Negation, Lexicon::negations_differ),
    (Veto::Entities, Lexicon::names_missing),
    (Veto::Opposites, Lexicon::opposite),
    (Veto::Direction, Lexicon::reversed),
    (Veto::Qualifier, Lexicon::qualified),
];

/// What the guards need to know about one question, computed once.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Lexicon {
    numbers: Vec<String>,
    negations: u32,
    entities: Vec<String>,
    /// Per pair of [`OPPOSITES`]: how many words of each side.
    opposites: Vec<(u16, u16)>,
    /// The content words right after `from`, and after `to`/`into`/`onto`, stemmed.
    from: Vec<String>,
    to: Vec<String>,
    /// Every lower-case word, for the prefix-antonym check (`safe` / `unsafe`).
    words: Vec<String>,
    /// The content words (not function words, negators or numbers): a question whose every
    /// content word the other has adds nothing to it.
    content: Vec<String>,
    /// The content words of qualifying phrases: after a [`QUALIFYING_PREPOSITIONS`] ("in
    /// babies", "for a gift card"), or in a hyphenated compound ("self-employed").
    qualifiers: Vec<String>,
}

/// Which guard vetoed a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Veto {
    Numbers,
    Negation,
    Entities,
    Opposites,
    Direction,
    Qualifier,
}

/// One word of the text as written, whether it opens a sentence, and what stands between it
/// and the word before.
struct Word {
    text: String,
    opens_sentence: bool,
    /// A punctuation mark (a comma included) since the word before: a phrase ends there.
    after_break: bool,
    /// Joined to the word before by a hyphen (`self-employed`, `end-of-tenancy`).
    hyphenated: bool,
}

fn words_of(text: &str) -> Vec<Word> {
    let text = text.replace(['\u{2019}', '\u{2018}', '`'], "'");
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut sentence_start = true;
    let (mut after_break, mut hyphenated) = (true, false);
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() {
            let start = i;
            while i < chars.len() {
                let c = chars[i];
                let joins = |i: usize| {
                    i > start
                        && i + 1 < chars.len()
                        && chars[i - 1].is_alphanumeric()
                        && chars[i + 1].is_alphanumeric()
                };
                if c.is_alphanumeric()
                    || (c == '\'' && joins(i))
                    || ((c == '.' || c == ',')
                        && joins(i)
                        && chars[i - 1].is_ascii_digit()
                        && chars[i + 1].is_ascii_digit())
                {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(Word {
                text: chars[start..i].iter().collect(),
                opens_sentence: sentence_start,
                after_break,
                hyphenated,
            });
            sentence_start = false;
            (after_break, hyphenated) = (false, false);
        } else {
            if matches!(c, '.' | '?' | '!' | ':' | ';' | '\n' | '"') {
                sentence_start = true;
            }
            let joins = c == '-'
                && i > 0
                && chars[i - 1].is_alphanumeric()
                && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
            if joins {
                hyphenated = true;
            } else if !c.is_whitespace() {
                after_break = true;
            }
            i += 1;
        }
    }
    out
}

/// Splits contractions: `don't` → `do` `not`, `can't` → `can` `not`, `what's` → `what`.
fn expand(lower: &str) -> Vec<String> {
    if let Some(base) = lower.strip_suffix("n't") {
        let base = match base {
            "ca" => "can",
            "wo" => "will",
            "sha" => "shall",
            b => b,
        };
        return vec![base.to_owned(), "not".to_owned()];
    }
    for suffix in ["'s", "'re", "'ve", "'ll", "'d", "'m"] {
        if let Some(base) = lower.strip_suffix(suffix) {
            return vec![base.to_owned()];
        }
    }
    vec![lower.to_owned()]
}

/// A light stem: plural and common verb endings off, so `refund`/`refunds` agree.
fn stem(word: &str) -> &str {
    for suffix in ["ing", "ed", "es", "s"] {
        if let Some(base) = word.strip_suffix(suffix) {
            if base.len() >= 3 {
                return base;
            }
        }
    }
    word
}

/// Digits of a numeric word: `£250,000` → `250000`, `10MB` → `10`, `3pm` → `3`.
/// A unit written onto its number stays with it: `7am` and `7pm`, `10MB` and `10GB` differ.
fn numbers_in(word: &str, out: &mut Vec<String>) {
    let mut current = String::new();
    let mut unit = false;
    let mut flush = |current: &mut String| {
        if !current.is_empty() {
            let n = current.trim_end_matches('.').to_owned();
            let n = n.strip_suffix(".0").map(str::to_owned).unwrap_or(n);
            out.push(n);
            current.clear();
        }
    };
    for c in word.chars() {
        if c.is_ascii_digit() && !unit {
            current.push(c);
        } else if (c == '.' || c == ',') && !current.is_empty() && !unit {
            if c == '.' {
                current.push(c);
            }
        } else if c.is_alphabetic() && !current.is_empty() {
            unit = true;
            current.extend(c.to_lowercase());
        } else {
            flush(&mut current);
            unit = false;
            if c.is_ascii_digit() {
                current.push(c);
            }
        }
    }
    flush(&mut current);
}

impl Lexicon {
    pub(crate) fn of(text: &str) -> Self {
        let mut lex = Self {
            opposites: vec![(0, 0); OPPOSITES.len()],
            ..Self::default()
        };
        let mut pending: Option<bool> = None;
        // Inside a qualifying phrase: whether its noun has come yet.
        let mut phrase: Option<bool> = None;
        let mut previous_content: Vec<String> = Vec::new();
        for w in words_of(text) {
            let lower = w.text.to_lowercase();
            if w.after_break {
                phrase = None;
            }
            if w.hyphenated {
                lex.qualifiers.append(&mut previous_content);
            }
            previous_content.clear();
            // Names: a capital letter not opening a sentence, or an acronym anywhere; digits
            // and number words are checked by the numbers guard instead.
            let first_upper = w.text.chars().next().is_some_and(char::is_uppercase);
            let acronym = w.text.chars().filter(|c| c.is_uppercase()).count() >= 2;
            if (first_upper && !w.opens_sentence && lower != "i") || acronym {
                let name = expand(&lower).swap_remove(0);
                if !name.chars().any(|c| c.is_ascii_digit())
                    && !FUNCTION_WORDS.contains(&name.as_str())
                {
                    lex.entities.push(name);
                }
            }
            if w.text.chars().any(|c| c.is_ascii_digit()) {
                numbers_in(&w.text, &mut lex.numbers);
            }
            for part in expand(&lower) {
                if part.is_empty() {
                    continue;
                }
                let number_word = NUMBER_WORDS.iter().find(|(word, _)| *word == part);
                if let Some((_, n)) = number_word {
                    lex.numbers.push((*n).to_owned());
                }
                if DATE_WORDS.contains(&part.as_str()) {
                    lex.entities.push(part.trim_end_matches('s').to_owned());
                }
                if NEGATORS.contains(&part.as_str()) {
                    lex.negations += 1;
                }
                for (slot, (yes, no)) in lex.opposites.iter_mut().zip(OPPOSITES) {
                    if yes.contains(&part.as_str()) {
                        slot.0 += 1;
                    } else if no.contains(&part.as_str()) {
                        slot.1 += 1;
                    }
                }
                let p = part.as_str();
                let content = number_word.is_none()
                    && !p.chars().any(|c| c.is_ascii_digit())
                    && !NEGATORS.contains(&p)
                    && !FUNCTION_WORDS.contains(&p);
                if content {
                    lex.content.push(part.clone());
                    previous_content.push(part.clone());
                    if w.hyphenated {
                        lex.qualifiers.push(part.clone());
                    }
                }
                if QUALIFYING_PREPOSITIONS.contains(&p) {
                    phrase = Some(false);
                } else if let Some(noun_seen) = phrase {
                    if content && (noun_seen || !IDIOM_HEADS.contains(&p)) {
                        lex.qualifiers.push(part.clone());
                        phrase = Some(true);
                    } else if content
                        || noun_seen
                        || !(DETERMINERS.contains(&p)
                            || number_word.is_some()
                            || p.chars().any(|c| c.is_ascii_digit()))
                    {
                        phrase = None;
                    }
                }
                match part.as_str() {
                    "from" => pending = Some(true),
                    "to" | "into" | "onto" => pending = Some(false),
                    p if !FUNCTION_WORDS.contains(&p) => match pending.take() {
                        Some(true) => lex.from.push(stem(p).to_owned()),
                        Some(false) => lex.to.push(stem(p).to_owned()),
                        None => {}
                    },
                    _ => {}
                }
                lex.words.push(part);
            }
        }
        lex.numbers.sort();
        lex.entities.sort();
        lex.entities.dedup();
        lex.words.sort();
        lex.words.dedup();
        for list in [&mut lex.content, &mut lex.qualifiers] {
            list.sort();
            list.dedup();
        }
        for list in [
            &mut lex.numbers,
            &mut lex.entities,
            &mut lex.from,
            &mut lex.to,
            &mut lex.words,
            &mut lex.content,
            &mut lex.qualifiers,
        ] {
            list.shrink_to_fit();
        }
        lex
    }

    /// The bytes it holds: the question's distinct words and what the guards derived from
    /// them. An index keeping it counts these against its bound.
    pub(crate) fn heap_bytes(&self) -> usize {
        let strings = |list: &Vec<String>| {
            list.capacity() * std::mem::size_of::<String>()
                + list.iter().map(String::capacity).sum::<usize>()
        };
        std::mem::size_of::<Self>()
            + strings(&self.numbers)
            + strings(&self.entities)
            + strings(&self.from)
            + strings(&self.to)
            + strings(&self.words)
            + strings(&self.content)
            + strings(&self.qualifiers)
            + self.opposites.capacity() * std::mem::size_of::<(u16, u16)>()
    }

    /// `Ok` when no guard objects to answering `self` with an answer to `other`. Stops at the
    /// first objection: the later guards are not run.
    pub(crate) fn agrees_with(&self, other: &Self) -> Result<(), Veto> {
        match self.objections(other).next() {
            Some(veto) => Err(veto),
            None => Ok(()),
        }
    }

    /// Every guard that objects, in the order they are checked, each run only when asked for:
    /// the benchmark takes them all, to tell what one guard alone adds (a pair only it turns
    /// down); a lookup only the first.
    pub(crate) fn objections<'a>(&'a self, other: &'a Self) -> impl Iterator<Item = Veto> + 'a {
        GUARDS
            .iter()
            .filter(move |(_, objects)| objects(self, other))
            .map(|&(veto, _)| veto)
    }

    fn numbers_differ(&self, other: &Self) -> bool {
        self.numbers != other.numbers
    }

    fn negations_differ(&self, other: &Self) -> bool {
        self.negations != other.negations
    }

    /// Casing is a hint, not a fact ("UK" / "uk", a title-cased question): a name of either
    /// side must be among the words of the other.
    fn names_missing(&self, other: &Self) -> bool {
        !names_found(&self.entities, &other.words) || !names_found(&other.entities, &self.words)
    }

    fn opposite(&self, other: &Self) -> bool {
        let flipped = self.opposites.iter().zip(&other.opposites).any(|(a, b)| {
            let yes = i32::from(a.0) - i32::from(b.0);
            let no = i32::from(a.1) - i32::from(b.1);
            yes * no < 0
        });
        flipped
            || prefix_antonym(&self.words, &other.words)
            || prefix_antonym(&other.words, &self.words)
    }

    /// `from` in one where the other has `to`, or each sends to a name the other has
    /// elsewhere: swapped ends ("a Word document to PDF" and "a PDF to a Word document").
    /// Names only: `to` is also the infinitive.
    fn reversed(&self, other: &Self) -> bool {
        if crossed(&self.from, &other.to) || crossed(&other.from, &self.to) {
            return true;
        }
        let (a, b) = (self.named_to(), other.named_to());
        a.iter().any(|t| !b.contains(t) && other.has_stem(t))
            && b.iter().any(|t| !a.contains(t) && self.has_stem(t))
    }

    fn qualified(&self, other: &Self) -> bool {
        self.adds_qualifier(other) || other.adds_qualifier(self)
    }

    /// Whether `self` narrows `other` with a qualifying phrase: a qualifier whose word the
    /// other lacks, while the other has no content word of its own ("the symptoms of flu in
    /// babies" / "the symptoms of flu"). When both have words of their own they traded words,
    /// as paraphrases do, and the cosine decides.
    fn adds_qualifier(&self, other: &Self) -> bool {
        self.qualifiers
            .iter()
            .any(|q| !has_counterpart(q, &other.words))
            && other
                .content
                .iter()
                .all(|w| has_counterpart(w, &self.words))
    }

    fn named_to(&self) -> Vec<&str> {
        self.to
            .iter()
            .filter(|t| self.entities.iter().any(|e| stem(e) == t.as_str()))
            .map(String::as_str)
            .collect()
    }

    fn has_stem(&self, s: &str) -> bool {
        self.words.iter().any(|w| stem(w) == s)
    }
}

/// Whether `words` has `w`, a word of the same stem, or (five letters or more) `w` one slip
/// away (`adress` / `address`, `baby` / `babies`).
fn has_counterpart(w: &str, words: &[String]) -> bool {
    words.iter().any(|o| {
        o == w
            || stem(o) == stem(w)
            || (w.len().max(o.len()) >= 5 && edit_distance(stem(w), stem(o)) <= 1)
    })
}

/// Whether `a` has a word that is a word of `b` with a negating prefix (`unsafe` / `safe`).
fn prefix_antonym(a: &[String], b: &[String]) -> bool {
    a.iter().any(|w| {
        ["un", "in", "im", "il", "ir", "dis", "non"]
            .iter()
            .any(|p| {
                w.strip_prefix(p).is_some_and(|rest| {
                    rest.len() >= 3
                        && b.binary_search_by(|x| x.as_str().cmp(rest)).is_ok()
                        && a.binary_search_by(|x| x.as_str().cmp(rest)).is_err()
                })
            })
    })
}

/// Whether every name in `names` is one of `words` (word endings and, in longer names, one
/// slip aside: `Mondays` / `Mondys`, not `Austria` / `Australia`).
fn names_found(names: &[String], words: &[String]) -> bool {
    names.iter().all(|n| {
        words.iter().any(|w| {
            w == n
                || stem(w) == stem(n)
                || (n.chars().count() >= 5 && edit_distance(stem(n), stem(w)) <= 1)
        })
    })
}

/// Whether one question goes from where the other goes to.
fn crossed(from: &[String], to: &[String]) -> bool {
    from.iter().any(|f| to.contains(f))
}

/// Damerau-Levenshtein (optimal string alignment) distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veto(a: &str, b: &str) -> Option<Veto> {
        Lexicon::of(a).agrees_with(&Lexicon::of(b)).err()
    }

    #[test]
    fn numbers_must_match() {
        assert_eq!(
            veto("Track order 48213", "Track order 48231"),
            Some(Veto::Numbers)
        );
        assert_eq!(
            veto("Is a 2-bedroom flat free?", "Is a two bedroom flat free?"),
            None
        );
        assert_eq!(
            veto(
                "Stamp duty on a £250,000 house?",
                "Stamp duty on a £250000 house?"
            ),
            None
        );
        assert_eq!(
            veto("Files over 10MB", "Files over 100MB"),
            Some(Veto::Numbers)
        );
    }

    #[test]
    fn negation_must_match() {
        assert_eq!(
            veto("Cancel my order please", "Don't cancel my order please"),
            Some(Veto::Negation)
        );
        assert_eq!(
            veto(
                "Which items can't be recycled?",
                "Which items can not be recycled?"
            ),
            None
        );
    }

    #[test]
    fn entities_must_match() {
        assert_eq!(
            veto(
                "What's the capital of Australia?",
                "What's the capital of Austria?"
            ),
            Some(Veto::Entities)
        );
        assert_eq!(
            veto(
                "What's the weather in Paris?",
                "Weather in Paris, what is it like?"
            ),
            None
        );
    }

    #[test]
    fn opposites_must_not_flip() {
        assert_eq!(
            veto(
                "Is the clinic open on Sundays?",
                "Is the clinic closed on Sundays?"
            ),
            Some(Veto::Opposites)
        );
        assert_eq!(
            veto(
                "Is ibuprofen safe with alcohol?",
                "Is ibuprofen unsafe with alcohol?"
            ),
            Some(Veto::Opposites)
        );
        assert_eq!(
            veto(
                "How do I turn on two-factor authentication?",
                "How do I turn off two-factor authentication?"
            ),
            Some(Veto::Opposites)
        );
    }

    #[test]
    fn generic_opposites_must_not_flip() {
        for (a, b) in [
            (
                "Does the price include delivery?",
                "Does the price exclude delivery?",
            ),
            (
                "How do I increase my credit limit?",
                "How do I decrease my credit limit?",
            ),
            (
                "Should I stretch before running?",
                "Should I stretch after running?",
            ),
            (
                "Is it a good time to buy shares?",
                "Is it a good time to sell shares?",
            ),
            ("How do I enable dark mode?", "How do I disable dark mode?"),
            ("How do I log in?", "How do I log out?"),
        ] {
            assert_eq!(veto(a, b), Some(Veto::Opposites), "{a} / {b}");
        }
        // Only a flip vetoes: a word of one side on one side alone is wording.
        assert_eq!(
            veto(
                "How do I increase my credit limit?",
                "How do I get a higher credit limit?"
            ),
            None
        );
    }

    #[test]
    fn tuning_half_entries_veto_their_traps() {
        // Entries added from errors of the tuning half (see the module doc), on those pairs.
        assert_eq!(
            veto(
                "Which foods should I eat before surgery?",
                "Which foods should I avoid before surgery?"
            ),
            Some(Veto::Negation)
        );
        for (a, b) in [
            (
                "Which airlines allow pets in the cabin?",
                "Which airlines ban pets in the cabin?",
            ),
            (
                "Can I cancel within the cooling-off period?",
                "Can I cancel after the cooling-off period?",
            ),
            (
                "Which subjects are compulsory at GCSE?",
                "Which subjects are optional at GCSE?",
            ),
            (
                "How do I pause my meal kit deliveries?",
                "How do I resume my meal kit deliveries?",
            ),
        ] {
            assert_eq!(veto(a, b), Some(Veto::Opposites), "{a} / {b}");
        }
    }

    #[test]
    fn reversed_direction_is_another_question() {
        assert_eq!(
            veto(
                "Transfer £50 from my savings to my current account",
                "Transfer £50 from my current account to my savings"
            ),
            Some(Veto::Direction)
        );
        assert_eq!(
            veto(
                "How do I convert a Word document to PDF?",
                "How do I convert a PDF to a Word document?"
            ),
            Some(Veto::Direction)
        );
        assert_eq!(
            veto(
                "Can I add my partner to my car insurance policy?",
                "To my car insurance policy, can I add my partner?"
            ),
            None
        );
    }

    #[test]
    fn an_added_qualifying_phrase_narrows_the_question() {
        for (a, b) in [
            // Who it is for.
            (
                "What are the side effects of ibuprofen?",
                "What are the side effects of ibuprofen in pregnancy?",
            ),
            // When.
            (
                "What time does the pool open?",
                "What time does the pool open during holidays?",
            ),
            // A noun of the phrase that the other lacks: a gift, a gift voucher.
            (
                "Can I get a refund for a gift?",
                "Can I get a refund for a gift voucher?",
            ),
            // A hyphenated modifier.
            (
                "Which expenses can I claim?",
                "Which expenses can I claim when self-employed?",
            ),
        ] {
            assert_eq!(veto(a, b), Some(Veto::Qualifier), "{a} / {b}");
            assert_eq!(veto(b, a), Some(Veto::Qualifier), "{b} / {a}");
        }
    }

    #[test]
    fn a_qualifier_both_sides_share_or_trade_is_wording() {
        for (a, b) in [
            // The same qualifier, reordered.
            (
                "Is there a discount for students?",
                "Do students get a discount?",
            ),
            // Each side has words of its own: a paraphrase trades words.
            (
                "What documents do I need for a visa?",
                "What paperwork is required for a visa application?",
            ),
            // A pronoun is no qualifier.
            ("Can you book a taxi?", "Can you book a taxi for me?"),
            // Fixed phrases qualify nothing.
            (
                "How do I reset my password?",
                "How do I reset my password? Thanks in advance",
            ),
            ("Can I pay by card?", "Can I pay by card at the moment?"),
        ] {
            assert_eq!(veto(a, b), None, "{a} / {b}");
            assert_eq!(veto(b, a), None, "{b} / {a}");
        }
    }

    #[test]
    fn every_objection_is_listed_the_first_decides() {
        let (a, b) = (
            Lexicon::of("Can I return 2 shirts?"),
            Lexicon::of("Can I not return 3 shirts in the sale?"),
        );
        assert_eq!(
            a.objections(&b).collect::<Vec<_>>(),
            vec![Veto::Numbers, Veto::Negation, Veto::Qualifier]
        );
        assert_eq!(a.agrees_with(&b), Err(Veto::Numbers));
    }

    #[test]
    fn wording_slips_and_filler_pass() {
        assert_eq!(
            veto(
                "How do I request a repeat prescription?",
                "How do I reqest a repeat perscription?"
            ),
            None
        );
        assert_eq!(
            veto(
                "How do I change the currency on my invoices?",
                "Hi team, how do I change the currency on my invoices?"
            ),
            None
        );
        assert_eq!(
            veto(
                "What does the refund process involve?",
                "What does the refunds process involve?"
            ),
            None
        );
        assert_eq!(
            veto("Do you accept Apple Pay?", "DO YOU ACCEPT APPLE PAY?"),
            None
        );
        assert_eq!(
            veto("Remind me at 7am", "Remind me at 7pm"),
            Some(Veto::Numbers)
        );
    }
}
