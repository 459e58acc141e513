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
//!   tenant/landlord, `safe`/`unsafe`, ...) where one question moved one way and the other the
//!   other way;
//! - **direction**: what comes after `from` in one question does not come after `to` in the
//!   other ("from my savings to my current account" and back again).

/// Words whose presence reverses a statement.
const NEGATORS: &[&str] = &[
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
    "cannot", "non", "avoid", "avoiding", "unable", "fail", "fails", "failed", "lack", "lacking",
];

/// Pairs of opposite word groups.
#[rustfmt::skip]
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
        &["allow", "allows", "allowed", "permit", "permits", "permitted"],
        &["ban", "bans", "banned", "forbidden", "prohibit", "prohibited", "disallowed"],
    ),
    (
        &["approve", "approved", "accept", "accepted", "accepts", "granted", "successful"],
        &[
            "reject", "rejected", "decline", "declined", "refuse", "refused", "deny", "denied",
            "unsuccessful",
        ],
    ),
    (
        &[
            "increase", "increases", "increased", "increasing", "raise", "raising", "more",
            "higher", "boost", "extend", "add", "adding", "upgrade", "up",
        ],
        &[
            "decrease", "decreases", "decreased", "decreasing", "reduce", "reduced", "reducing",
            "lower", "less", "fewer", "cut", "shorten", "remove", "removing", "downgrade", "down",
        ],
    ),
    (
        &["on", "enable", "enabled", "activate", "activated", "start", "starting"],
        &["off", "disable", "disabled", "deactivate", "deactivated", "stop", "stopping"],
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
        &["send", "sending", "sent", "outgoing", "outbound", "export", "upload"],
        &["receive", "receiving", "received", "incoming", "inbound", "import", "download"],
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
        &["max", "maximum", "most", "largest", "biggest", "highest", "longest"],
        &["min", "minimum", "least", "smallest", "lowest", "shortest"],
    ),
    (
        &["domestic", "national", "inland"],
        &["international", "abroad", "overseas", "foreign"],
    ),
    (
        &["online", "digital", "electronic", "electronically", "website", "app"],
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
        &["child", "children", "kid", "kids", "baby", "infant", "teen", "teenager", "minor"],
    ),
    (
        &["dog", "dogs", "puppy", "puppies"],
        &["cat", "cats", "kitten", "kittens"],
    ),
    (
        &["weekday", "weekdays"],
        &["weekend", "weekends"],
    ),
    (
        &["win", "won", "winning"],
        &["lose", "lost", "losing"],
    ),
    (
        &["in", "into", "inside"],
        &["out", "outside"],
    ),
    (
        &["tenant", "tenants", "renter", "renters"],
        &["landlord", "landlords", "landlady", "letting"],
    ),
    (
        &["buyer", "buyers"],
        &["seller", "sellers", "vendor"],
    ),
    (
        &["employer", "employers"],
        &["employee", "employees", "staff", "worker"],
    ),
    (
        &["economy"],
        &["business", "premium"],
    ),
    (
        &["full", "whole", "entire"],
        &["part", "partial", "half"],
    ),
    (
        &["under", "below", "within", "inside"],
        &["over", "above", "beyond", "after", "outside"],
    ),
    (
        &["same"],
        &["next", "different", "another"],
    ),
    (
        &["benefit", "benefits", "advantage", "advantages", "pros", "upside", "upsides"],
        &["drawback", "drawbacks", "disadvantage", "disadvantages", "cons", "downside", "downsides", "risks"],
    ),
    (
        &["hot", "warm", "summer", "busy", "compulsory", "mandatory", "required"],
        &["cold", "cool", "winter", "quiet", "optional", "voluntary"],
    ),
    (
        &["pause", "paused", "suspend", "freeze"],
        &["resume", "resumed", "restart", "unfreeze", "reactivate"],
    ),
    (
        &["good", "great", "excellent", "outstanding", "best", "better", "working", "properly",
          "positive", "pass", "passed"],
        &["bad", "poor", "inadequate", "worst", "worse", "fault", "faulty", "broken", "negative",
          "failing"],
    ),
];

/// Number words and ordinals, with the digits they stand for.
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
    ("eighth", "8"), ("ninth", "9"), ("tenth", "10"), ("twice", "2"),     ];

/// Days, months, relative days and colours: one that differs is a different question. (`may`
/// is left out: it is far more often the verb.)
#[rustfmt::skip]
const TIME_WORDS: &[&str] = &[
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "mondays",
    "tuesdays", "wednesdays", "thursdays", "fridays", "saturdays", "sundays", "january", "february",
    "march", "april", "june", "july", "august", "september", "october", "november", "december",
    "today", "tomorrow", "yesterday", "tonight", "red", "blue", "green", "yellow", "black", "white",
    "orange", "purple", "pink", "grey", "gray", "brown", "silver", "gold",
];

/// Words that carry no content of their own: differences in them are wording, not meaning.
#[rustfmt::skip]
const FUNCTION_WORDS: &[&str] = &[
    "um", "uh", "er", "erm", "so", "yeah", "yes", "sorry", "silly", "bother", "cheers",
    "morning", "hiya", "advance", "usually", "ok", "okay",
    "a", "an", "the", "i", "me", "my", "mine", "we", "us", "our", "you", "your", "yours", "it",
    "its", "they", "them", "their", "this", "that", "these", "those", "is", "are", "was", "were",
    "be", "been", "being", "am", "do", "does", "did", "doing", "have", "has", "had", "having",
    "can", "could", "will", "would", "shall", "should", "may", "might", "must", "need", "to", "of",
    "in", "for", "at", "by", "from", "with", "about", "into", "through", "as", "and", "or", "but",
    "if", "so", "then", "than", "there", "here", "what", "which", "who", "whom", "whose", "when",
    "where", "why", "how", "whats", "any", "some", "all", "each", "every", "just", "also", "too",
    "very", "really", "please", "hi", "hello", "hey", "team", "thanks", "thank", "there", "anyone",
    "someone", "somebody", "something", "somewhere", "anything", "anywhere", "way", "quick",
    "question", "wondering", "want", "like", "know", "tell", "get", "got", "go", "going",
    "possible", "able", "kindly", "actually", "exactly", "basically", "ok", "okay", "s", "d", "ll",
    "re", "ve", "m", "t", "is", "out", "over", "own", "same", "such", "only", "much", "many", "bit",
    "help", "now", "currently", "right",
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
}

/// Which guard vetoed a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Veto {
    Numbers,
    Negation,
    Entities,
    Opposites,
    Direction,
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
        for w in words_of(text) {
            let lower = w.text.to_lowercase();
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
        // Casing is a hint, not a fact ("UK" / "uk", a title-cased question): a name of
        // either side must be among the words of the other.
        if !names_found(&self.entities, &other.words) || !names_found(&other.entities, &self.words)
        {
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
        if crossed(&self.from, &other.to) || crossed(&other.from, &self.to) {
            return Err(Veto::Direction);
        }
        // Each sends to a name the other has elsewhere: swapped ends ("a Word document to PDF"
        // and "a PDF to a Word document"). Names only: `to` is also the infinitive.
        let (a, b) = (self.named_to(), other.named_to());
        if a.iter().any(|t| !b.contains(t) && other.has_stem(t))
            && b.iter().any(|t| !a.contains(t) && self.has_stem(t))
        {
            return Err(Veto::Direction);
        }
        Ok(())
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
