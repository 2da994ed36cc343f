use unicode_normalization::{char::is_combining_mark, UnicodeNormalization};

/// A string as FHIR string search compares it: case- and accent-insensitive, so "Müller",
/// "MULLER" and "muller" all become "muller". The store indexes names in this form and the
/// facade folds the searched value the same way, so the index and the matcher always agree.
/// NUL (the store's key separator) is dropped.
pub fn fold_search_string(s: &str) -> String {
    s.nfd()
        .filter(|c| !is_combining_mark(*c) && *c != '\0')
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_accents_fold_away_and_other_letters_stay() {
        assert_eq!(fold_search_string("Müller"), "muller");
        assert_eq!(fold_search_string("MÜLLER"), "muller");
        assert_eq!(fold_search_string("Zoë Ñúñez-Ørsted"), "zoe nunez-ørsted");
        assert_eq!(fold_search_string("Ǆ\0x"), "ǆx");
        assert_eq!(fold_search_string("李"), "李");
    }
}
