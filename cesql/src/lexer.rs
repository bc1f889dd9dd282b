//! Splits an expression into tokens, each with its 1-based character position.

use crate::ParseError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    /// A run of letters, digits and `_`: a keyword, number, identifier or function name,
    /// told apart by the parser.
    Word(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub tok: Tok,
    pub position: usize,
}

pub(crate) fn tokenize(text: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let position = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let (tok, len) = match c {
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ',' => (Tok::Comma, 1),
            '+' => (Tok::Plus, 1),
            '-' => (Tok::Minus, 1),
            '*' => (Tok::Star, 1),
            '/' => (Tok::Slash, 1),
            '%' => (Tok::Percent, 1),
            '=' => (Tok::Eq, 1),
            '!' if chars.get(i + 1) == Some(&'=') => (Tok::NotEq, 2),
            '<' if chars.get(i + 1) == Some(&'>') => (Tok::NotEq, 2),
            '<' if chars.get(i + 1) == Some(&'=') => (Tok::Le, 2),
            '<' => (Tok::Lt, 1),
            '>' if chars.get(i + 1) == Some(&'=') => (Tok::Ge, 2),
            '>' => (Tok::Gt, 1),
            '\'' | '"' => {
                let (value, len) = string_literal(&chars, i)?;
                (Tok::Str(value), len)
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let len = chars[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                    .count();
                (Tok::Word(chars[i..i + len].iter().collect()), len)
            }
            other => {
                return Err(ParseError {
                    position,
                    message: format!("unexpected character {other:?}"),
                });
            }
        };
        tokens.push(Token { tok, position });
        i += len;
    }
    Ok(tokens)
}

/// A `'…'` or `"…"` literal starting at `start`; inside, a backslash escapes the delimiter and
/// any other backslash is kept as written (so `LIKE` patterns keep their `\%` and `\_`).
fn string_literal(chars: &[char], start: usize) -> Result<(String, usize), ParseError> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if chars.get(i + 1) == Some(&quote) => {
                value.push(quote);
                i += 2;
            }
            c if c == quote => return Ok((value, i + 1 - start)),
            c => {
                value.push(c);
                i += 1;
            }
        }
    }
    Err(ParseError {
        position: start + 1,
        message: format!("string literal is not closed (missing {quote})"),
    })
}
