"""Streamlit: a button whose clicks the script's session counts."""

import streamlit as st

st.session_state.setdefault("clicks", 0)
if st.button("Click"):
    st.session_state.clicks += 1
st.write(f"clicks: {st.session_state.clicks}")
