//! Procedural macros for [ferrostream](https://docs.rs/ferrostream). Use them through `ferrostream` with its
//! `macros` feature (`ferrostream::debug_handler`), not from this crate directly.

use proc_macro::TokenStream;
use proc_macro2::{TokenStream as TokenStream2, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Item, ItemFn, ReturnType, Safety, Type};

/// The most arguments a handler may take (`Handler` is implemented for functions of up to 8 arguments).
const MAX_ARGS: usize = 8;

/// `#[debug_handler]` checks a handler `async fn` where it is defined, and reports each mistake at the
/// piece of the signature that is wrong (without it, a wrong signature fails at `.handle(..)` with one
/// error, "this is not a ferrostream handler", that lists what is allowed but not what is wrong):
///
/// - each argument type must be an extractor (`ferrostream::extract::FromMessage`): the error points at
///   that argument's type ("`Order` cannot be a handler argument", take `Json<Order>`);
/// - a borrowed argument (`&str`, `&[u8]`, `&Message`...) gets an error naming the owned type to take
///   instead (`String`, `Bytes`, `Message`...);
/// - the return type must be a handler return value (`ferrostream::HandlerReturn`): the error points at
///   the return type ("`u32` cannot be returned from a handler", return `Json(..)` or a `String`);
/// - the function must be an `async fn`, take at most 8 arguments, and have no generic parameters;
/// - its future must be `Send`: the error points at the function's name and at the value held across
///   an `.await` (an `Rc`, a `RefCell` borrow, a `std::sync::MutexGuard`...).
///
/// The function itself is emitted unchanged: the checks are items that are never called, so the
/// handler behaves and performs exactly as without the attribute. The checks refer to `::ferrostream`,
/// so the attribute works in any crate that depends on `ferrostream` (under that name). It applies to
/// free functions (in a module or a block), not to methods.
#[proc_macro_attribute]
pub fn debug_handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = TokenStream2::from(attr);
    let item = TokenStream2::from(item);
    let checks = match expand(attr, item.clone()) {
        Ok(checks) => checks,
        Err(e) => e.into_compile_error(),
    };
    quote!(#item #checks).into()
}

/// The checks for a handler: a hidden const block of never-called items, or the errors found in the
/// signature itself.
fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    if let Some(first) = attr.into_iter().next() {
        return Err(syn::Error::new(first.span(), "`#[debug_handler]` takes no arguments"));
    }
    let function = match syn::parse2::<Item>(item)? {
        Item::Fn(f) => f,
        other => {
            return Err(syn::Error::new_spanned(
                other,
                "`#[debug_handler]` goes on a handler `async fn`",
            ));
        }
    };
    check_signature(&function)?;

    let sig = &function.sig;
    let name = &sig.ident;
    let mut checks = Vec::new();
    for arg in &sig.inputs {
        if let FnArg::Typed(arg) = arg {
            let ty = &arg.ty;
            // The user's tokens keep their spans: an error points at this argument's type.
            checks.push(quote_spanned! {ty.span()=> handler_argument::<#ty>(); });
        }
    }
    if let ReturnType::Type(_, ty) = &sig.output
        && !contains_impl(ty.to_token_stream())
    {
        checks.push(quote_spanned! {ty.span()=> handler_return_value::<#ty>(); });
    }
    let anys = sig.inputs.iter().map(|_| quote!(__ferrostream_any()));
    checks.push(quote_spanned! {name.span()=>
        handler_future_must_be_send_so_hold_no_rc_refcell_or_non_send_guard_across_await(#name(#(#anys),*));
    });

    // A named const, not `const _`: in an `impl` block (not supported) the only error is then that the
    // function is not found, not also that `_` is not a valid name there.
    let check_name = quote::format_ident!("__ferrostream_debug_handler_{}", name);
    Ok(quote! {
        #[allow(warnings, clippy::all, clippy::pedantic, clippy::nursery)]
        #[doc(hidden)]
        const #check_name: () = {
            fn __ferrostream_any<T>() -> T {
                loop {}
            }
            fn handler_argument<T: ::ferrostream::extract::FromMessage>() {}
            fn handler_return_value<T: ::ferrostream::HandlerReturn>() {}
            fn handler_future_must_be_send_so_hold_no_rc_refcell_or_non_send_guard_across_await<
                F: ::core::future::Future + ::core::marker::Send,
            >(_: F) {
            }
            fn __ferrostream_checks() {
                #(#checks)*
            }
        };
    })
}

/// What the compiler cannot say well about a handler's signature: each mistake found, as one error.
fn check_signature(function: &ItemFn) -> syn::Result<()> {
    let sig = &function.sig;
    let name = &sig.ident;
    let mut errors: Vec<syn::Error> = Vec::new();

    if sig.asyncness.is_none() {
        let returns_future = matches!(&sig.output, ReturnType::Type(_, ty) if contains_impl(ty.to_token_stream()));
        let message = if returns_future {
            format!(
                "a handler must be an `async fn`: `#[debug_handler]` checks `async fn` handlers only; write \
                 `async fn {name}(..)` returning the output, or remove the attribute"
            )
        } else {
            format!("a handler must be an `async fn`: write `async fn {name}(..)`")
        };
        errors.push(syn::Error::new(sig.fn_token.span, message));
    }
    if let Safety::Unsafe(token) = &sig.safety {
        errors.push(syn::Error::new(
            token.span,
            "a handler cannot be an `unsafe fn`: move the unsafe code into an `unsafe` block inside it",
        ));
    }
    if let Some(abi) = &sig.abi {
        errors.push(syn::Error::new_spanned(
            abi,
            "a handler is a plain Rust `async fn`, with no `extern` ABI",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "`#[debug_handler]` does not check generic handlers: a handler's argument and return types must \
             be concrete; check a non-generic handler, or remove the attribute",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new_spanned(variadic, "a handler cannot be variadic"));
    }

    for (i, arg) in sig.inputs.iter().enumerate() {
        if i == MAX_ARGS {
            errors.push(syn::Error::new_spanned(
                arg,
                format!(
                    "a handler takes at most {MAX_ARGS} arguments, `{name}` takes {}: group values in one \
                     `State<T>` struct, or read them from the `Message`",
                    sig.inputs.len()
                ),
            ));
        }
        let ty = match arg {
            FnArg::Receiver(receiver) => {
                errors.push(syn::Error::new_spanned(
                    receiver,
                    "a handler is a free `async fn`, not a method: it cannot take `self`",
                ));
                continue;
            }
            FnArg::Typed(arg) => &*arg.ty,
        };
        if let Some(error) = borrowed_argument(ty) {
            errors.push(error);
        } else if contains_impl(ty.to_token_stream()) {
            errors.push(syn::Error::new_spanned(
                ty,
                "`#[debug_handler]` does not check generic handlers: an `impl Trait` argument makes the \
                 handler generic; name a concrete extractor type",
            ));
        }
    }

    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(mut first) => {
            for e in errors {
                first.combine(e);
            }
            Err(first)
        }
    }
}

/// The error for an argument that borrows (`&str`, `Cow<'_, str>`...), naming the owned type to take.
fn borrowed_argument(ty: &Type) -> Option<syn::Error> {
    let (shown, instead) = match ty {
        Type::Reference(r) => {
            let referent = &*r.elem;
            let instead = match type_string(referent).as_str() {
                "str" => "`String`".to_owned(),
                "[u8]" => "`Bytes` (or `Vec<u8>`)".to_owned(),
                // An extractor taken by reference: take it by value.
                "Message" | "Headers" | "Key" | "Attempt" | "String" | "Bytes" | "Vec<u8>" => {
                    format!("`{}`", type_string(referent))
                }
                other => format!("`Json<{other}>` (a payload), `State<{other}>` (shared state) or `{other}`"),
            };
            (type_string(ty), instead)
        }
        _ if contains_borrowed_lifetime(ty.to_token_stream()) => (
            type_string(ty),
            "an owned type (`String`, `Bytes`, `Json<T>` of an owned `T`...)".to_owned(),
        ),
        _ => return None,
    };
    Some(syn::Error::new_spanned(
        ty,
        format!(
            "handler arguments are owned: take {instead} instead of `{shown}` (the handler's future may \
             outlive the message, so it cannot borrow from it)"
        ),
    ))
}

/// Whether the tokens hold `impl` (an `impl Trait` type, which cannot be named in a check).
fn contains_impl(tokens: TokenStream2) -> bool {
    tokens.into_iter().any(|t| match t {
        TokenTree::Ident(i) => i == "impl",
        TokenTree::Group(g) => contains_impl(g.stream()),
        _ => false,
    })
}

/// Whether the tokens hold a lifetime other than `'static` (`'_`, `'a`).
fn contains_borrowed_lifetime(tokens: TokenStream2) -> bool {
    let mut after_quote = false;
    for t in tokens {
        match t {
            TokenTree::Punct(p) if p.as_char() == '\'' => {
                after_quote = true;
                continue;
            }
            TokenTree::Ident(i) if after_quote && i != "static" => return true,
            TokenTree::Group(g) if contains_borrowed_lifetime(g.stream()) => return true,
            _ => {}
        }
        after_quote = false;
    }
    false
}

/// A type as the user would write it (`Json<Order>`, not `Json < Order >`).
fn type_string(ty: &Type) -> String {
    let mut s = ty.to_token_stream().to_string();
    for (from, to) in [
        (" <", "<"),
        ("< ", "<"),
        (" >", ">"),
        (" ,", ","),
        (" ::", "::"),
        (":: ", "::"),
        ("& ", "&"),
    ] {
        s = s.replace(from, to);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(s: &str) -> Type {
        syn::parse_str(s).unwrap()
    }

    #[test]
    fn types_print_as_written() {
        assert_eq!(type_string(&ty("Json<Vec<Order>>")), "Json<Vec<Order>>");
        assert_eq!(type_string(&ty("&'static str")), "&'static str");
        assert_eq!(type_string(&ty("&[u8]")), "&[u8]");
        assert_eq!(type_string(&ty("std::sync::Arc<A, B>")), "std::sync::Arc<A, B>");
    }

    #[test]
    fn borrows_are_found() {
        assert!(contains_borrowed_lifetime(ty("Cow<'_, str>").to_token_stream()));
        assert!(contains_borrowed_lifetime(
            ty("Json<Vec<Cow<'a, str>>>").to_token_stream()
        ));
        assert!(!contains_borrowed_lifetime(
            ty("Json<Cow<'static, str>>").to_token_stream()
        ));
        assert!(
            borrowed_argument(&ty("&str"))
                .unwrap()
                .to_string()
                .contains("take `String` instead of `&str`")
        );
        assert!(
            borrowed_argument(&ty("&mut Message"))
                .unwrap()
                .to_string()
                .contains("take `Message`")
        );
        assert!(borrowed_argument(&ty("Json<Order>")).is_none());
    }

    #[test]
    fn impl_trait_is_found() {
        assert!(contains_impl(ty("Vec<impl Send>").to_token_stream()));
        assert!(!contains_impl(ty("Json<Implement>").to_token_stream()));
    }

    fn expanded(item: &str) -> String {
        expand(TokenStream2::new(), item.parse().unwrap())
            .unwrap_or_else(|e| e.into_compile_error())
            .to_string()
    }

    #[test]
    fn mistakes_in_the_signature_are_named() {
        assert!(expanded("fn h(body: String) {}").contains("a handler must be an `async fn`: write `async fn h(..)`"));
        assert!(expanded("async fn h<T>(body: T) {}").contains("does not check generic handlers"));
        let nine = "async fn h(a: String, b: String, c: String, d: String, e: String, f: String, g: String, \
                    h: String, i: String) {}";
        assert!(expanded(nine).contains("at most 8 arguments, `h` takes 9"));
        assert!(expanded("async fn h(&self) {}").contains("not a method"));
        assert!(expanded("struct S;").contains("goes on a handler `async fn`"));
    }

    #[test]
    fn a_correct_handler_gets_a_check_per_argument_and_the_return_type() {
        let out = expanded("async fn h(a: Json<Order>, b: Message) -> Result<(), Error> { todo!() }");
        assert_eq!(out.matches("handler_argument :: <").count(), 2, "{out}");
        assert!(out.contains("handler_return_value :: < Result"), "{out}");
        assert!(
            out.contains("(h (__ferrostream_any () , __ferrostream_any ()))"),
            "{out}"
        );
        assert!(expanded("async fn r#type() {}").contains("const __ferrostream_debug_handler_type"));
    }
}
