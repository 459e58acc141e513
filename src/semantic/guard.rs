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
//! - **small edits**: two questions that share their words but for one or two content words
//!   ("... for economy passengers" / "... for business passengers") ask different things;
//!   spelling slips, word endings and filler ("hi team,") do not count.

/// Words whose presence reverses a statement.
const NEGATORS: &[&str] = &[
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
    "cannot", "avoid", "avoiding", "unable", "fail", "fails", "failed", "lack", "lacking",
];

/// Pairs of opposite word groups.
const OPPOSITES: &[(&[&str], &[&str])] = &[
    (
        &["open", "opens", "opened", "opening"],
        &["close", "closes", "closed", "closing", "shut"],
    ),
    (
        &["include", "includes", "included", "including", "inclusive"],
        &["exclude", "excludes", "excluded", "excluding", "exclusive"],
    ),
    (
        &[
            "allow",
            "allows",
            "allowed",
            "permit",
            "permits",
            "permitted",
        ],
        &[
            "ban",
            "bans",
            "banned",
            "forbidden",
            "prohibit",
            "prohibited",
            "disallowed",
        ],
    ),
    (
        &[
            "approve",
            "approved",
            "accept",
            "accepted",
            "accepts",
            "granted",
            "successful",
        ],
        &[
            "reject",
            "rejected",
            "decline",
            "declined",
            "refuse",
            "refused",
            "deny",
            "denied",
            "unsuccessful",
        ],
    ),
    (
        &[
            "increase",
            "increases",
            "increased",
            "increasing",
            "raise",
            "raising",
            "more",
            "higher",
            "boost",
            "extend",
            "add",
            "adding",
            "upgrade",
            "up",
        ],
        &[
            "decrease",
            "decreases",
            "decreased",
            "decreasing",
            "reduce",
            "reduced",
            "reducing",
            "lower",
            "less",
            "fewer",
            "cut",
            "shorten",
            "remove",
            "removing",
            "downgrade",
            "down",
        ],
    ),
    (
        &[
            "on",
            "enable",
            "enabled",
            "activate",
            "activated",
            "start",
            "starting",
        ],
        &[
            "off",
            "disable",
            "disabled",
            "deactivate",
            "deactivated",
            "stop",
            "stopping",
        ],
    ),
    (
        &["safe", "safely", "recommended", "healthy"],
        &["unsafe", "dangerous", "harmful", "unhealthy", "risky"],
    ),
    (
        &["before", "prior", "earlier", "early", "advance"],
        &["after", "later", "late", "afterwards"],
    ),
    (
        &["buy", "buying", "bought", "purchase", "purchasing"],
        &["sell", "selling", "sold"],
    ),
    (
        &[
            "send", "sending", "sent", "outgoing", "outbound", "export", "upload",
        ],
        &[
            "receive",
            "receiving",
            "received",
            "incoming",
            "inbound",
            "import",
            "download",
        ],
    ),
    (
        &["deposit", "deposits", "credit", "credits"],
        &["withdraw", "withdrawal", "withdrawals", "debit", "debits"],
    ),
    (
        &["join", "joining", "arrive", "arrival", "arrivals"],
        &["leave", "leaving", "depart", "departure", "departures"],
    ),
    (
        &[
            "max", "maximum", "most", "largest", "biggest", "highest", "longest",
        ],
        &["min", "minimum", "least", "smallest", "lowest", "shortest"],
    ),
    (
        &["domestic", "national", "inland"],
        &["international", "abroad", "overseas", "foreign"],
    ),
    (
        &[
            "online",
            "digital",
            "electronic",
            "electronically",
            "website",
            "app",
        ],
        &["paper", "postal", "offline", "printed", "person"],
    ),
    (
        &[
            "son", "boy", "he", "his", "him", "man", "men", "male", "husband", "father", "dad",
            "brother",
        ],
        &[
            "daughter", "girl", "she", "her", "woman", "women", "female", "wife", "mother", "mum",
            "mom", "sister",
        ],
    ),
    (
        &["adult", "adults"],
        &[
            "child", "children", "kid", "kids", "baby", "infant", "teen", "teenager", "minor",
        ],
    ),
    (
        &["dog", "dogs", "puppy", "puppies"],
        &["cat", "cats", "kitten", "kittens"],
    ),
    (&["weekday", "weekdays"], &["weekend", "weekends"]),
    (&["win", "won", "winning"], &["lose", "lost", "losing"]),
];

/// Number words and ordinals, with the digits they stand for.
const NUMBER_WORDS: &[(&str, &str)] = &[
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("thirteen", "13"),
    ("fourteen", "14"),
    ("fifteen", "15"),
    ("sixteen", "16"),
    ("seventeen", "17"),
    ("eighteen", "18"),
    ("nineteen", "19"),
    ("twenty", "20"),
    ("thirty", "30"),
    ("forty", "40"),
    ("fifty", "50"),
    ("sixty", "60"),
    ("seventy", "70"),
    ("eighty", "80"),
    ("ninety", "90"),
    ("hundred", "100"),
    ("thousand", "1000"),
    ("million", "1000000"),
    ("billion", "1000000000"),
    ("half", "0.5"),
    ("dozen", "12"),
    ("first", "1"),
    ("second", "2"),
    ("third", "3"),
    ("fourth", "4"),
    ("fifth", "5"),
    ("sixth", "6"),
    ("seventh", "7"),
    ("eighth", "8"),
    ("ninth", "9"),
    ("tenth", "10"),
    ("twice", "2"),
    ("once", "1"),
    ("single", "1"),
    ("double", "2"),
];

/// Days, months and relative days: a time that differs is a different question. (`may` is
/// left out: it is far more often the verb.)
const TIME_WORDS: &[&str] = &[
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "mondays",
    "tuesdays",
    "wednesdays",
    "thursdays",
    "fridays",
    "saturdays",
    "sundays",
    "january",
    "february",
    "march",
    "april",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "today",
    "tomorrow",
    "yesterday",
    "tonight",
];

/// Words that carry no content of their own: differences in them are wording, not meaning.
const FUNCTION_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "i",
    "me",
    "my",
    "mine",
    "we",
    "us",
    "our",
    "you",
    "your",
    "yours",
    "it",
    "its",
    "they",
    "them",
    "their",
    "this",
    "that",
    "these",
    "those",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "do",
    "does",
    "did",
    "doing",
    "have",
    "has",
    "had",
    "having",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
    "need",
    "to",
    "of",
    "in",
    "for",
    "at",
    "by",
    "from",
    "with",
    "about",
    "into",
    "through",
    "as",
    "and",
    "or",
    "but",
    "if",
    "so",
    "then",
    "than",
    "there",
    "here",
    "what",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "whats",
    "any",
    "some",
    "all",
    "each",
    "every",
    "just",
    "also",
    "too",
    "very",
    "really",
    "please",
    "hi",
    "hello",
    "hey",
    "team",
    "thanks",
    "thank",
    "there",
    "anyone",
    "someone",
    "somebody",
    "something",
    "somewhere",
    "anything",
    "anywhere",
    "way",
    "quick",
    "question",
    "wondering",
    "want",
    "like",
    "know",
    "tell",
    "get",
    "got",
    "go",
    "going",
    "possible",
    "able",
    "kindly",
    "actually",
    "exactly",
    "basically",
    "ok",
    "okay",
    "s",
    "d",
    "ll",
    "re",
    "ve",
    "m",
    "t",
    "is",
    "out",
    "over",
    "own",
    "same",
    "such",
    "only",
    "much",
    "many",
    "bit",
    "help",
    "now",
    "currently",
    "right",
];

/// What the guards need to know about one question, computed once.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Lexicon {
    numbers: Vec<String>,
    negations: u32,
    entities: Vec<String>,
    /// Per pair of [`OPPOSITES`]: how many words of each side.
    opposites: Vec<(u16, u16)>,
    /// Content words (not function words), stemmed, sorted.
    content: Vec<String>,
    /// Every lower-case word, for the prefix-antonym check (`safe` / `unsafe`).
    words: Vec<String>,
}

/// Which guard vetoed a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Veto {
    Numbers,
    Negation,
    Entities,
    Opposites,
    SmallEdit,
}

/// One word of the text as written, and whether it opens a sentence.
struct Word {
    text: String,
    opens_sentence: bool,
}

fn words_of(text: &str) -> Vec<Word> {
    let text = text.replace(['\u{2019}', '\u{2018}', '`'], "'");
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut sentence_start = true;
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
            });
            sentence_start = false;
        } else {
            if matches!(c, '.' | '?' | '!' | ':' | ';' | '\n' | '"') {
                sentence_start = true;
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
fn numbers_in(word: &str, out: &mut Vec<String>) {
    let mut current = String::new();
    let mut flush = |current: &mut String| {
        if !current.is_empty() {
            let n = current.trim_end_matches('.').to_owned();
            let n = n.strip_suffix(".0").map(str::to_owned).unwrap_or(n);
            out.push(n);
            current.clear();
        }
    };
    for c in word.chars() {
        if c.is_ascii_digit() || (c == '.' && !current.is_empty()) {
            current.push(c);
        } else if c == ',' && !current.is_empty() {
        } else {
            flush(&mut current);
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
        for w in words_of(text) {
            let lower = w.text.to_lowercase();
            // Names: a capital letter not opening a sentence, or an acronym anywhere; digits
            // and number words are checked by the numbers guard instead.
            let first_upper = w.text.chars().next().is_some_and(char::is_uppercase);
            let acronym = w.text.chars().filter(|c| c.is_uppercase()).count() >= 2;
            if (first_upper && !w.opens_sentence && lower != "i") || acronym {
                let name = expand(&lower).swap_remove(0);
                if !name.chars().any(|c| c.is_ascii_digit()) {
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
                if TIME_WORDS.contains(&part.as_str()) {
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
                let is_number = number_word.is_some()
                    || part
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.' || c == ',');
                if !FUNCTION_WORDS.contains(&part.as_str())
                    && !NEGATORS.contains(&part.as_str())
                    && !is_number
                {
                    lex.content.push(stem(&part).to_owned());
                }
                lex.words.push(part);
            }
        }
        lex.numbers.sort();
        lex.entities.sort();
        lex.entities.dedup();
        lex.content.sort();
        lex.words.sort();
        lex.words.dedup();
        lex
    }

    /// `Ok` when no guard objects to answering `self` with an answer to `other`.
    pub(crate) fn agrees_with(&self, other: &Self) -> Result<(), Veto> {
        if self.numbers != other.numbers {
            return Err(Veto::Numbers);
        }
        if self.negations != other.negations {
            return Err(Veto::Negation);
        }
        if self.entities != other.entities {
            return Err(Veto::Entities);
        }
        for (a, b) in self.opposites.iter().zip(&other.opposites) {
            let yes = i32::from(a.0) - i32::from(b.0);
            let no = i32::from(a.1) - i32::from(b.1);
            if yes * no < 0 {
                return Err(Veto::Opposites);
            }
        }
        if prefix_antonym(&self.words, &other.words) || prefix_antonym(&other.words, &self.words) {
            return Err(Veto::Opposites);
        }
        if small_edit(&self.content, &other.content) {
            return Err(Veto::SmallEdit);
        }
        Ok(())
    }
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

/// The largest number of differing content words that still counts as a small edit.
const SMALL_EDIT_WORDS: usize = 2;

/// Whether two sorted content-word lists differ by a small edit: one or two words swapped in
/// or out, while at least as many are shared. Spelling slips (an edit distance of one or two
/// in a longer word) pair off and do not count.
fn small_edit(a: &[String], b: &[String]) -> bool {
    let (mut only_a, mut only_b, mut shared) = (Vec::new(), Vec::new(), 0usize);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                shared += 1;
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_a.push(x.as_str());
                i += 1;
            }
            (Some(_), Some(y)) => {
                only_b.push(y.as_str());
                j += 1;
            }
            (Some(x), None) => {
                only_a.push(x.as_str());
                i += 1;
            }
            (None, Some(y)) => {
                only_b.push(y.as_str());
                j += 1;
            }
            (None, None) => break,
        }
    }
    // Pair off spelling slips.
    only_a.retain(|x| {
        if let Some(k) = only_b.iter().position(|y| is_slip(x, y)) {
            only_b.swap_remove(k);
            shared += 1;
            false
        } else {
            true
        }
    });
    let differing = only_a.len() + only_b.len();
    differing > 0 && differing <= SMALL_EDIT_WORDS && shared >= differing
}

fn is_slip(a: &str, b: &str) -> bool {
    let longest = a.chars().count().max(b.chars().count());
    let allowed = match longest {
        0..=3 => 0,
        4..=6 => 1,
        _ => 2,
    };
    allowed > 0 && edit_distance(a, b) <= allowed
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
    fn a_small_edit_of_content_words_is_another_question() {
        assert_eq!(
            veto(
                "What's the deadline for filing an online tax return?",
                "What's the deadline for filing a paper tax return?"
            ),
            Some(Veto::Opposites)
        );
        assert_eq!(
            veto(
                "Do you offer a guarantee on labour?",
                "Do you offer a guarantee on parts?"
            ),
            Some(Veto::SmallEdit)
        );
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
    }
}
