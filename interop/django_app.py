"""django_app.py - a whole Django project in one file, for the interop tests.

    python gateway.py --wsgi django_app:application --app-dir interop
    python gateway.py --asgi django_app:asgi_application --app-dir interop

Settings, URLs and views live here; there is no database. The views cover a
GET with a query string, a POST body read through request.body (also when the
client sends it chunked: the server spools it and sets CONTENT_LENGTH, which
Django needs), a multipart upload, a StreamingHttpResponse and 404s.
"""

import hashlib

from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    SECRET_KEY="interop-tests-only-not-secret",
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    DATABASES={},
    MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
    TEMPLATES=[],
    USE_TZ=True,
    # request.body refuses bodies over this (default 2.5 MB); uploads up to
    # 8 MiB are enough for the tests.
    DATA_UPLOAD_MAX_MEMORY_SIZE=8 * 1024 * 1024,
)

from django.core.asgi import get_asgi_application  # noqa: E402  (after configure)
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import Http404, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402

STREAM_CHUNKS = [b"django chunk %d\n" % n for n in range(4)]


@require_GET
def hello(request):
    return JsonResponse({"hello": "django", "q": request.GET.get("q"),
                         "path": request.path})


@csrf_exempt
@require_POST
def body(request):
    data = request.body
    return JsonResponse({"length": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "content_length": request.META.get("CONTENT_LENGTH")})


@csrf_exempt
@require_POST
def upload(request):
    upload = request.FILES["file"]
    digest, size = hashlib.sha256(), 0
    for piece in upload.chunks():
        digest.update(piece)
        size += len(piece)
    return JsonResponse({"filename": upload.name, "size": size,
                         "sha256": digest.hexdigest(), "fields": request.POST.dict()})


@require_GET
def stream(request):
    return StreamingHttpResponse(iter(STREAM_CHUNKS), content_type="text/plain")


def missing(request):
    raise Http404("no such thing")


urlpatterns = [
    path("hello", hello),
    path("body", body),
    path("upload", upload),
    path("stream", stream),
    path("missing", missing),
]

application = get_wsgi_application()

# The same project over ASGI: python gateway.py --asgi django_app:asgi_application
asgi_application = get_asgi_application()
