"""Dash: a button whose clicks a server callback counts.

The dash preset sets DASH_URL_BASE_PATHNAME (read by `Dash()`), PORT and HOST
(read by `app.run()`): the app sets none of them itself.
"""

from dash import Dash, Input, Output, html

app = Dash(__name__, title="dash")
app.layout = html.Div([html.Button("Click", id="click"), html.Div("clicks: 0", id="clicks")])


@app.callback(Output("clicks", "children"), Input("click", "n_clicks"), prevent_initial_call=True)
def count(n: int) -> str:
    return f"clicks: {n}"


if __name__ == "__main__":
    app.run(debug=False)
