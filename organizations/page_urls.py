"""Page routes for accounts: signing in and out, sign-up, API tokens, the CLI login pages."""

from django.contrib.auth.views import LogoutView
from django.urls import path

from organizations import views

app_name = "accounts"

urlpatterns = [
    path("", views.home, name="home"),
    path("login", views.SignInView.as_view(), name="login"),
    # Django's LogoutView accepts POST only, so a link or an <img> can't sign anyone out.
    path("logout", LogoutView.as_view(), name="logout"),
    path("signup", views.signup, name="signup"),
    path("settings/tokens", views.api_tokens, name="tokens"),
    path("settings/tokens/<uuid:token_id>/revoke", views.revoke_api_token, name="revoke-token"),
    path("cli-login", views.cli_login, name="cli-login"),
]
